"""`python -m omnivox ...`: the same command line as the `omnivox` script."""

import sys

from .cli import main

sys.exit(main())
