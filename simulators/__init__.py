"""City simulators: fleets of devices publishing realistic telemetry over MQTT."""
