"""`python -m livecomments serve`."""

import sys

from livecomments.cli import main

sys.exit(main())
