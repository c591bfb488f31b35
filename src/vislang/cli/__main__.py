"""``python -m vislang.cli ...`` (and ``torchrun -m vislang.cli train ...``)."""

import sys

from .main import main

sys.exit(main())
