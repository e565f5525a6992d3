"""The Prometheus exposition keeps every metric's name, type, help and labels as components
build them."""

from __future__ import annotations

import pytest

from ioc_core.metrics import CONTENT_TYPE, Metric, render


def test_counters_and_gauges_keep_their_names_and_labels() -> None:
    rejected = Metric("ioc_gateway_rejected_total", "counter", "messages dead-lettered, by reason")
    rejected.add(3, reason="bad_topic").add(1, reason='odd "reason"\n')
    text = render(
        [
            Metric("ioc_gateway_received_total", "counter", "messages taken from the broker").add(5),
            rejected,
            Metric("ioc_processor_lag", "gauge", "records behind").add(7, topic="t", partition="0"),
            Metric("ioc_devices", "gauge", "registered devices, by status"),
        ]
    ).decode()
    assert text.splitlines() == [
        "# HELP ioc_gateway_received_total messages taken from the broker",
        "# TYPE ioc_gateway_received_total counter",
        "ioc_gateway_received_total 5.0",
        "# HELP ioc_gateway_rejected_total messages dead-lettered, by reason",
        "# TYPE ioc_gateway_rejected_total counter",
        'ioc_gateway_rejected_total{reason="bad_topic"} 3.0',
        'ioc_gateway_rejected_total{reason="odd \\"reason\\"\\n"} 1.0',
        "# HELP ioc_processor_lag records behind",
        "# TYPE ioc_processor_lag gauge",
        'ioc_processor_lag{partition="0",topic="t"} 7.0',
        "# HELP ioc_devices registered devices, by status",
        "# TYPE ioc_devices gauge",
    ]
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


def test_a_metric_is_checked_where_it_is_named() -> None:
    with pytest.raises(ValueError, match="_total"):
        Metric("ioc_things", "counter", "a counter without its suffix")
    with pytest.raises(ValueError, match="kind"):
        Metric("ioc_things", "histogram", "not a kind we expose")
