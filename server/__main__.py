"""`python -m pixelrnn.server --repository DIR [--grpc-port P --http-port P --metrics-port P]`: see server/launcher.py."""
import sys

from pixelrnn.server.launcher import main

sys.exit(main())
