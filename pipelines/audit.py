"""Entry point `audit`: a model scores every tile of a prepared dataset against its labels (whole scenes through
the served tiling); writes the tiles and scenes worst first, a figure of the worst tiles (image, label,
prediction) and an exclusion list that `train -P exclude=` honours."""

from __future__ import annotations

import json

from pipelines._cli import parser_for, run
from rsseg.audit import audit
from rsseg.config import AuditConfig, from_args


def main(argv: list[str] | None = None) -> int:
    config: AuditConfig = from_args(AuditConfig, parser_for(AuditConfig, __doc__).parse_args(argv))
    print(json.dumps(audit(config), indent=2, default=str))
    return 0


if __name__ == "__main__":
    run(main)
