import sys

from plexus.testing.command import main

sys.exit(main())
