"""City simulators: fleets of devices on real city maps publishing realistic telemetry over MQTT.

`cities` (the maps of wards, and their approximate areas), `fleet` (devices, their places and
limits, registration), `scenarios` (what happens, and its ground truth in `truth`), `links` and
`runner` (scenario mode: a connection per device), `load` and `wire` (load mode), `city` (a
simulated city inside `ioc up`), `simulate` (the `ioc simulate` command).
"""
