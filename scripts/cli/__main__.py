"""``python -m fedlinear.scripts.cli ...``: the ``fedlinear`` command (tests and subprocesses use it)."""

import sys

from fedlinear.scripts.cli import main

sys.exit(main())
