"""Stream processors: telemetry from the bus into storage (and, later, detection and alarms)."""
