"""``python -m dropsafe._cli``."""

import sys

from dropsafe._cli import main

sys.exit(main())
