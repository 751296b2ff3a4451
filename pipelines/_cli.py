"""What every entry point shares: logging set-up, one-line errors with a non-zero exit, and clean-up on
SIGTERM/SIGINT (exit 128 + the signal number)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

EXIT_USER_ERROR = 2

# Import names whose distribution is named otherwise, for the one-line "not installed" error.
_DISTRIBUTIONS = {"nvidia": "nvidia-dali-cuda120", "tritonclient": "tritonclient[all]", "cv2": "opencv-python-headless",
                  "segmentation_models_pytorch": "segmentation-models-pytorch (the bench extra)",
                  "yaml": "pyyaml", "sklearn": "scikit-learn"}


def _missing_dependency(kind: type[BaseException], exc: BaseException, traceback: object) -> None:
    """An entry point run where a dependency is missing (wrong environment, partial set-up) says so in one line,
    at import time or later, instead of a traceback."""
    name = getattr(exc, "name", None)
    if not issubclass(kind, ModuleNotFoundError) or not name or name.split(".")[0] in ("rsseg", "pipelines"):
        sys.__excepthook__(kind, exc, traceback)  # type: ignore[arg-type]
        return
    top = name.split(".")[0]
    print(f"error: the Python package {_DISTRIBUTIONS.get(top, top)!r} is not installed in this environment "
          f"({sys.executable}); set up with `bash scripts/setup.sh` and run from .venv, or let `mlflow run .` build "
          "the project's environment (conda.yaml)", file=sys.stderr)


sys.excepthook = _missing_dependency  # entry points import this module first; set before anything else loads

from rsseg.config import add_arguments  # noqa: E402
from rsseg.errors import UserError  # noqa: E402
from rsseg.signals import Interrupted, exit_on_signals  # noqa: E402


def parser_for(config_cls: type, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser, config_cls)
    return parser


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("alembic", "mlflow.store", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        with exit_on_signals():
            code = main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", EXIT_USER_ERROR))
    except Interrupted as exc:
        print(f"error: {exc}; what was being written was removed", file=sys.stderr)
        sys.exit(exc.exit_code)
    sys.exit(code or 0)
