"""The kvstate archiver: finished operations snapshotted into PostgreSQL, exactly once per revision.

Modules: ``settings`` (ArchiverSettings), ``worker`` (the Archiver loop), ``store``
(batch writes), ``read`` (the read API the dashboard and CLI use), ``migrations``
(versioned SQL), ``cli`` (``kvstate archiver``, ``kvstate archive``). See docs/archive.md.
Importing the package imports none of them, so ``archiver.read`` stays light.
"""
