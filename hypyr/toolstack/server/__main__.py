import sys

from hypyr.toolstack.server import main

sys.exit(main())
