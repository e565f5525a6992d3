"""Services that `ioc up` runs inside its own process when no real one is configured."""
