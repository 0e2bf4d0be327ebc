import sys

from sendtime.cli import main

sys.exit(main())
