"""Whole-stack benchmarks (``runyard bench stack``) and their measuring helpers.

:mod:`runyard.bench.stack` starts the four services, a loopback provider and
PostgreSQL, drives sessions through the public gateway and reports
throughput, latency, CPU per process and PostgreSQL work per run.
:mod:`runyard.bench.procstat` reads the counters it needs (``/proc`` CPU
time, the PostgreSQL server's processes, ``pg_stat_database``, WAL).
"""
