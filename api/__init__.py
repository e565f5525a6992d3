"""The operations-center HTTP API."""
