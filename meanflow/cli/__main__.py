"""``python -m meanflow.cli ...``: the ``meanflow`` command, e.g. under ``torchrun``."""

import sys

from meanflow.cli import main

sys.exit(main())
