"""``python -m gaspar`` is the ``gaspar`` command."""

import sys

from .cli import main

sys.exit(main())
