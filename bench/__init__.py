"""Benchmarks: kvstate's own throughput, and the head-to-head comparison with a PostgreSQL row per operation."""
