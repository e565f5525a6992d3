"""The `ioc` command: composes the components of `ingest`, `processors`, `api` and `simulators`."""
