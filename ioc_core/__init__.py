"""Shared kernel of the operations-center backend: settings, domain models, storage and bus.

`ingest`, `processors`, `api` and `simulators` import this package; it imports none of them.
"""
