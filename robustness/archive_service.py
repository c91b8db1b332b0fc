"""A pipeline service for the T20 soak, as a process of its own (so its memory can be sampled).

    python -m robustness.archive_service NATS_URL BUCKET RATE SECONDS OUT

Runs ``RATE`` operations a second through every stage for ``SECONDS`` seconds (the
archive harness's ``Workload``), and appends one ``id revision`` line per operation to
``OUT`` as it finishes (nothing is kept in memory), then one ``error ...`` line per error.
Ends by itself.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import TextIO

from kvstate import Client, Settings
from robustness.archive_harness import OpRecord, Workload

__all__ = ["main"]


async def _serve(nats_url: str, bucket: str, rate: float, seconds: float, lines: TextIO) -> int:
    settings = Settings(nats_url=nats_url, bucket=bucket, replicas=3)

    def record(done: OpRecord) -> None:
        lines.write(f"{done.op_id} {done.revision}\n")  # as it finishes: nothing kept in memory

    async with Client(settings, name="robust-service") as client:
        workload = Workload(client, max(1, round(rate * seconds)), seconds, concurrency=64, on_done=record)
        await workload.run()
    lines.write("".join(f"error {e}\n" for e in workload.errors))
    return 0


def main(argv: list[str]) -> int:
    """Run the service; the exit code."""
    nats_url, bucket, rate, seconds, out = argv
    with open(Path(out), "a", buffering=1) as lines:
        return asyncio.run(_serve(nats_url, bucket, float(rate), float(seconds), lines))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
