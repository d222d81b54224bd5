import sys

from turbowan.cli.main import main

sys.exit(main())
