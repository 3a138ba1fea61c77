"""Entry point for ``python -m kb``."""

import sys

import core.settings  # noqa: F401  (sets the offline environment before any model library loads)
from kb.cli import main

sys.exit(main())
