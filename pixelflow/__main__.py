import sys

from pixelflow.cli import main

sys.exit(main())
