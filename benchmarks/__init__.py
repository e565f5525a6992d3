"""Benchmarks that print figures; run against the services of `make services`."""
