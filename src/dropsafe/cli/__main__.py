"""``python -m dropsafe.cli``."""

import sys

from dropsafe.cli import main

sys.exit(main())
