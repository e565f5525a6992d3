"""The stable reason codes of rejected device messages: dead letters and counters are keyed by
them, and operators filter on them, so a code never changes once published."""

from __future__ import annotations

REASON_TOO_LARGE = "payload_too_large"
REASON_BAD_TOPIC = "bad_topic"
REASON_MALFORMED = "malformed_payload"
REASON_UNKNOWN_DEVICE = "unknown_device"
REASON_DEVICE_MISMATCH = "device_mismatch"
REASON_UNKNOWN_METRIC = "unknown_metric"
REASON_NOT_FINITE = "not_finite"
REASON_OUT_OF_RANGE = "out_of_range"
# A SenML value in a unit (`u`, `bu`) that is unknown or does not measure what its metric measures.
REASON_UNIT_MISMATCH = "unit_mismatch"
REASON_BAD_TIMESTAMP = "bad_timestamp"
REASON_FUTURE_TIMESTAMP = "future_timestamp"
REASON_NO_METRICS = "no_metrics"
REASON_BAD_STATUS = "bad_status"
# Telemetry published with the retain flag: the broker would hand the reading again to every new
# subscriber, so only the status topic may be retained.
REASON_RETAINED = "retained_telemetry"
# A message that made validation fail in a way it does not foresee: kept, never fatal to the gateway.
REASON_UNPROCESSABLE = "unprocessable"
