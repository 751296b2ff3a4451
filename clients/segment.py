"""Segment large scenes through a Triton server: `python clients/segment.py SCENE ... --out DIR`.

Thin entry point; the work is in rsseg.client (see `--help`).
"""

import sys

from rsseg.client.cli import main

if __name__ == "__main__":
    sys.exit(main())
