import sys

from layertap.cli.app import main

sys.exit(main())
