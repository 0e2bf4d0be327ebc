import sys

from sendtime.server.cli import main

sys.exit(main())
