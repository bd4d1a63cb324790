"""The sans-IO core: every decision the library makes, and no I/O.

It builds script calls (:mod:`.steps`), reads their replies into frozen results
(:mod:`.results`), decides locks (:mod:`.locks`) and rate limits (:mod:`.buckets`), lays out
the keys (:mod:`.keys`, :mod:`.arguments`) and runs a unique task's lifecycle. It imports
neither redis, anyio nor Celery; the executors carry its steps out.
"""
