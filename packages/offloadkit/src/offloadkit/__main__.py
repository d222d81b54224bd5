import sys

from offloadkit.cli import main

sys.exit(main())
