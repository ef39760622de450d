"""``python -m plexus.cli``: the same as ``plexus-gateway``."""

import sys

from plexus.cli import main

sys.exit(main())
