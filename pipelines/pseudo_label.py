"""Entry point `pseudo_label`: a teacher (registered version(s)) labels a folder of unlabelled scenes where it is
sure (probability >= threshold, the ignore index elsewhere), through the served tiling; the result is a
prepared dataset recording its teacher, threshold and kept share per class."""

from __future__ import annotations

import json

from pipelines._cli import parser_for, run
from rsseg.config import PseudoLabelConfig, from_args
from rsseg.pseudo_labels import pseudo_label


def main(argv: list[str] | None = None) -> int:
    config: PseudoLabelConfig = from_args(PseudoLabelConfig, parser_for(PseudoLabelConfig, __doc__).parse_args(argv))
    print(json.dumps(pseudo_label(config), indent=2, default=str))
    return 0


if __name__ == "__main__":
    run(main)
