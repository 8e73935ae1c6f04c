"""``python -m gaspar`` is the ``gaspar`` command."""

import sys

from gaspar.cli import main

sys.exit(main())
