"""``python -m mpsd`` is the ``mpsd`` command."""

import sys

from mpsd.cli import main

sys.exit(main())
