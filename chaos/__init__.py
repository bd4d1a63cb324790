"""The chaos suite: ``python -m chaos`` (``nox -s chaos``).

Client processes (sync, async, and Celery workers running unique tasks) use the library
through a fault proxy while a seeded nemesis pauses, kills, cuts, slows and flushes Redis and
freezes clients; every process writes a history, and the checker then proves each promise
held (or names the history lines that show it did not). See docs/chaos.md.

Why a top-level package rather than ``tests/chaos``: a run is one long program with its own
command line (seed, duration, faults, replay), not a set of pytest cases, and its client
processes are spawned, so they must import it by a stable name; pytest's collection, per-test
timeouts and warning filters would only be in the way. Its checker is pure and has fast unit
tests in ``tests/unit/test_chaos_checker.py``, which ``nox -s tests`` runs.

Layout: ``history`` (the JSON-lines records and the shared clock), ``checker`` (the checks and
the figures), ``proxy`` (the network faults), ``nemesis`` (every fault, seeded), ``clients``
(the lock, semaphore and rate-limit clients), ``tasks`` (the Celery app of the task clients
and workers), ``runner`` (one run end to end) and ``__main__`` (the command line).
"""
