import sys

from hypyr.cli import main

sys.exit(main())
