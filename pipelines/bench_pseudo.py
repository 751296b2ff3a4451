"""Entry point `bench_pseudo`: a student trained on a labelled third of the training scenes, alone, with a larger
teacher's pseudo labels on the rest, with distillation from that teacher, with both, and with all labels, at
the same student budget, on roads and Dubai land cover (and, on LEVIR-CD made SECOND-style, a teacher's labels for
the unchanged areas); scored by `evaluate`'s code through the served tiling.
Needs ../shared/data; run it alone."""

from __future__ import annotations

import argparse
import json

from pipelines._cli import run
from rsseg.bench.pseudo import format_pseudo_table, format_second_table, pseudo_row, second_row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", action="append", default=[], choices=["roads", "dubai", "second"],
                        help="run these datasets only (repeat; default all three; second: LEVIR-CD made "
                             "SECOND-style, its unchanged areas pseudo-labelled)")
    parser.add_argument("--budget", type=float, default=150.0, help="training seconds per student")
    parser.add_argument("--teacher-budget", type=float, default=300.0, help="training seconds of the teacher")
    parser.add_argument("--labelled-share", type=float, default=1 / 3, help="share of training scenes kept labelled")
    parser.add_argument("--threshold", type=float, default=0.9, help="pseudo-label confidence threshold")
    args = parser.parse_args(argv)
    rows, second = [], []
    for name in args.dataset or ["roads", "dubai", "second"]:
        if name == "second":
            row = second_row(args.budget, args.teacher_budget, args.threshold)
            second.append(row)
        else:
            row = pseudo_row(name, args.budget, args.teacher_budget, args.labelled_share, args.threshold)
            rows.append(row)
        print(json.dumps(row), flush=True)
    if rows:
        print(format_pseudo_table(rows), flush=True)
    if second:
        print(format_second_table(second), flush=True)
    return 0


if __name__ == "__main__":
    run(main)
