"""Lets `python -m agent` behave like the `sovd-edge` console script."""

import sys

from agent.cli import main

sys.exit(main())
