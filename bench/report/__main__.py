"""python -m bench.report: write (or --check) docs/measurements.md."""
import sys

from bench.report import main

sys.exit(main())
