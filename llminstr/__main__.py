"""``python -m llminstr``: the same command line as the ``llminstr`` script."""

import sys

from llminstr.cli import main

sys.exit(main())
