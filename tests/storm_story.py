"""The simulated storm's whole story, by incident kind: rain, levels past alert then danger, the
district, the grid, the roads. The storm's simulation, its replay through the detectors and its run
against the real services each expect all of it."""

STORM_STORY = frozenset(
    {
        "heavy_rain",
        "water_level_alert",
        "water_level_danger",
        "district_flood",
        "feeder_voltage_sag",
        "traffic_standstill",
    }
)
