"""The kvstate archiver: finished operations snapshotted into PostgreSQL, exactly once per revision.

Modules: ``settings`` (ArchiverSettings), ``worker`` (the Archiver: lifecycle and fetch
loop), ``classify`` (which messages need a row), ``batch`` (the size-or-time batch
buffer), ``writer`` (one transaction at a time, then the acks), ``removals`` (the
removal heap and the remover), ``sweep`` (removals left behind), ``accounting`` (counts
and metrics), ``store`` (batch writes), ``rows`` (the archive row of an operation),
``read`` (the read API the dashboard and CLI use), ``migrations`` (versioned SQL),
``metrics`` (/metrics and /healthz), ``cli`` (``kvstate archiver``, ``kvstate
archive``). The archiver reads the bucket through ``kvstate.feed.ChangeFeed`` and
``kvstate.Client`` only. See docs/archive.md. Importing the package imports none of
them, so ``archiver.read`` stays light.
"""
