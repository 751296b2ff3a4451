"""Entry point `evaluate`: score a registered version, a run's model or an ensemble of versions the way it is
served (whole scenes, the client's tiling, ONNX Runtime in process or a running Triton server); logs a run in
`rsseg-evaluations` and tags the version with eval_<metric>."""

from __future__ import annotations

import json

from pipelines._cli import parser_for, run
from rsseg.config import EvaluateConfig, from_args
from rsseg.scoring import evaluate


def main(argv: list[str] | None = None) -> int:
    config: EvaluateConfig = from_args(EvaluateConfig, parser_for(EvaluateConfig, __doc__).parse_args(argv))
    summary = evaluate(config)
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    run(main)
