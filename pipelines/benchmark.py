"""Entry point `benchmark`: train the seed UNet on real data for a fixed wall-clock budget and print the
validation headline metric beside the constant-prediction baselines (needs ../shared/data)."""

from __future__ import annotations

import argparse
import json

from pipelines._cli import run
from rsseg import tracking
from rsseg.bench.datasets import RECIPES, baselines, benchmark_config, prepare_benchmark
from rsseg.training import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="roads", choices=[*RECIPES, "all"])
    parser.add_argument("--budget", type=float, default=600.0, help="training seconds per dataset")
    args = parser.parse_args(argv)
    rows = []
    for name in RECIPES if args.dataset == "all" else [args.dataset]:
        data = prepare_benchmark(name)
        config = benchmark_config(name, data.root, args.budget)
        with tracking.start_run(run_name=f"benchmark-{name}", experiment="rsseg-benchmark"):
            tracking.log_config(config, "train")
            result = train(config, data, on_epoch_end=tracking.epoch_logger())
            headline = f"val_{result.spec.dataset.headline_metric}"
            row = {
                "dataset": name, "budget_s": args.budget, "epochs": len(result.history),
                "best_epoch": result.best_epoch, "train_tiles_per_s": round(result.history[-1]["train_tiles_per_s"], 2),
                "metric": headline, "value": round(result.best_metrics.get(headline, float("nan")), 4),
                "baselines": {k: round(v, 4) for k, v in baselines(result).items()},
            }
            tracking.log_benchmark(row)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return 0


if __name__ == "__main__":
    run(main)
