"""``python -m bazaar``: the ``bazaar`` command (how ``bazaar serve`` starts its workers)."""

import sys

from bazaar.cli import main

sys.exit(main())
