"""Where a training run is (steps, seconds across resumes) and when it validates next."""

from __future__ import annotations

import time

import torch

from rsseg.config import TrainConfig, validations_under_budget


class RunProgress:
    """Where a run is: steps taken, seconds spent (across resumes), and when to validate next.

    Under a time budget, progress is elapsed / budget and its validations are spread evenly over it (an
    epoch of a large dataset can take minutes: validating after each would eat the budget); without
    one, progress is steps / (epochs x steps per epoch) and every epoch is validated.
    """

    def __init__(self, config: TrainConfig, steps_per_epoch: int) -> None:
        self.config = config
        self.total_steps = max(1, config.epochs * steps_per_epoch)
        self.steps = 0
        self._spent = 0.0  # seconds of earlier sessions (resume)
        self._started = time.monotonic()
        self._validations = 0
        self.snapshots: list[dict[str, torch.Tensor]] = []  # weights at the end of each cosine cycle (snapshots)

    def elapsed(self) -> float:
        return self._spent + time.monotonic() - self._started

    def fraction(self) -> float:
        if self.config.time_budget:
            return self.elapsed() / self.config.time_budget
        return self.steps / self.total_steps

    def over_budget(self) -> bool:
        return bool(self.config.time_budget) and self.elapsed() > self.config.time_budget

    def validation_due(self) -> bool:
        if not self.config.time_budget:
            return True
        every = 1.0 / validations_under_budget(self.config)
        return self.fraction() >= (self._validations + 1) * every

    def validated(self) -> None:
        self._validations += 1

    def state(self) -> dict[str, float]:
        return {"steps": self.steps, "elapsed": self.elapsed(), "validations": self._validations}

    def restore(self, state: dict[str, float]) -> None:
        self.steps = int(state.get("steps", 0))
        self._spent = float(state.get("elapsed", 0.0))
        self._validations = int(state.get("validations", 0))
        self._started = time.monotonic()
