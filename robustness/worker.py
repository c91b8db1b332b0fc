"""``python -m robustness.worker SPEC.json``: one load process of a scenario (robustness.workload)."""

from __future__ import annotations

import sys

from robustness.workload import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
