"""MQTT ingest gateway: devices' telemetry in, validated readings onto the bus."""
