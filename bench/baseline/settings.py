"""Settings of the baseline Operation service, built at the process edge from an environment mapping."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from kvstate.errors import ConfigurationError

__all__ = ["BaselineSettings"]


@dataclass(frozen=True)
class BaselineSettings:
    """Where the baseline service keeps its rows and how many connections it pools.

    ====================== ================================================ ==========================
    variable               default                                          meaning
    ====================== ================================================ ==========================
    DATABASE_URL           postgresql://postgres@127.0.0.1:5432/postgres    the PostgreSQL database
    BASELINE_POOL_SIZE     20                                               pooled connections
    ====================== ================================================ ==========================
    """

    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    pool_size: int = 20

    ENV: ClassVar[dict[str, str]] = {"database_url": "DATABASE_URL", "pool_size": "BASELINE_POOL_SIZE"}

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> BaselineSettings:
        """Settings from an environment mapping (``os.environ`` at the process edge)."""
        raw_size = environ.get("BASELINE_POOL_SIZE", "").strip()
        pool_size = cls.pool_size
        if raw_size:
            try:
                pool_size = int(raw_size)
            except ValueError:
                pool_size = 0
            if pool_size < 1:
                raise ConfigurationError(f"BASELINE_POOL_SIZE={raw_size!r} is not valid: must be a positive integer")
        return cls(database_url=environ.get("DATABASE_URL", "").strip() or cls.database_url, pool_size=pool_size)
