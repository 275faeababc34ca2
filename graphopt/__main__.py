"""``python -m graphopt`` runs the CLI."""

import sys

from graphopt.cli import main

sys.exit(main())
