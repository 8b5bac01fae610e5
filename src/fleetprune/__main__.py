import sys

from fleetprune.cli import main

sys.exit(main())
