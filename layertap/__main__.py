import sys

from layertap.cli.main import main

sys.exit(main())
