"""Detection: pure per-device detectors that turn readings into alarm findings, with state that
round-trips through JSON, and flood correlation across the stations of a zone.

No I/O happens here. The processor loads each device's profile and state, calls
`DeviceDetection.evaluate` with the device's readings of a batch, stores the state back with the
readings, and hands the findings to the alarm store.
"""

from __future__ import annotations

from ioc_core.alarms import DISTRICT_FLOOD_RULE, OFFLINE_RULE, Finding, district_subject
from ioc_core.rules import SEVERITIES, severity_rank
from processors.detection.detectors import DetectionSettings, DeviceDetection
from processors.detection.district import DistrictFloodCorrelator, StationSignal
from processors.detection.findings import offline_finding
from processors.detection.judgements import DETECTOR_KINDS
from processors.detection.profile import DeviceProfile, FloodZone
from processors.detection.state import DeviceDetectorState

__all__ = [
    "DETECTOR_KINDS",
    "DISTRICT_FLOOD_RULE",
    "OFFLINE_RULE",
    "SEVERITIES",
    "DetectionSettings",
    "DeviceDetection",
    "DeviceDetectorState",
    "DeviceProfile",
    "DistrictFloodCorrelator",
    "Finding",
    "FloodZone",
    "StationSignal",
    "district_subject",
    "offline_finding",
    "severity_rank",
]
