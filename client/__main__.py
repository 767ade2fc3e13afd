import sys

from pixelrnn.client.cli import main

sys.exit(main())
