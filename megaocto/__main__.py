import sys

from megaocto.cli import main

sys.exit(main())
