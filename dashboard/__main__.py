"""``python -m dashboard``: serve the dashboard (same as ``kvstate dashboard``)."""

import sys

from dashboard.cli import main

sys.exit(main())
