"""Entry point `promote`: the best registered version becomes the served champion (or `--rollback`)."""

from __future__ import annotations

import json

from pipelines._cli import parser_for, run
from rsseg.config import PromoteConfig, from_args
from rsseg.promotion import promote, rollback


def main(argv: list[str] | None = None) -> int:
    config: PromoteConfig = from_args(PromoteConfig, parser_for(PromoteConfig, __doc__).parse_args(argv))
    summary = rollback(config) if config.rollback else promote(config)
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    run(main)
