"""`python -m pixelrnn COMMAND ...`: the same as the `pixelrnn` console command."""
import sys

from pixelrnn.cli import main

sys.exit(main())
