"""What every entry point shares: logging set-up, one-line errors with a non-zero exit, and clean-up on
SIGTERM/SIGINT (exit 128 + the signal number)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from rsseg.config import add_arguments
from rsseg.errors import UserError
from rsseg.signals import Interrupted, exit_on_signals

EXIT_USER_ERROR = 2


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
