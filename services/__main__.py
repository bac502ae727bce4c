"""``python -m runyard``: the ``runyard`` command."""

import sys

from runyard.cli.main import main

sys.exit(main())
