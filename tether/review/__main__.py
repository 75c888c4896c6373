"""`python -m tether.review RUN ...`: `tether review` on its own (what the tests drive through a pseudo terminal)."""

from __future__ import annotations

import argparse
import os
import sys

from tether.errors import TetherError
from tether.review.command import DESCRIPTION, add_arguments, run_review


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv``, run the review and exit with its status; errors are one line, as in the `tether` CLI."""
    # quiet transformers as the `tether` CLI does, without importing it before it is needed (a resumed review
    # never loads a model)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = argparse.ArgumentParser(prog="tether review", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        code = run_review(args)
    except TetherError as e:
        print(f"tether: {e}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        print("tether: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
