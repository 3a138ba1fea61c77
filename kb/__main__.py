"""Entry point for ``python -m kb``."""

import sys

import core.settings  # noqa: F401  (sets the offline environment before any model library loads)
from kb.cli import READ_ONLY, build_parser, exit_now, run

args = build_parser("--json" in sys.argv[1:]).parse_args()
code = run(args)
if args.command in READ_ONLY:
    exit_now(code)
sys.exit(code)
