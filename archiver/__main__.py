"""``python -m archiver``: run the archiver (configured by NATS_URL, DATABASE_URL, ARCHIVER_*)."""

import sys

from archiver.cli import main

sys.exit(main())
