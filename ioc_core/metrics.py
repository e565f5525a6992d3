"""Prometheus exposition, shared by every component's `/metrics`.

Components describe what they measure per scrape as `Metric` lists; `render` hands them to
prometheus_client as one collector on a private registry, so no component's metrics are global
state and the text format is the client library's.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric as MetricFamily
from prometheus_client.registry import Collector

# The text format `generate_latest` writes (the client's "latest" content type names a newer one).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# Prometheus names a counter's samples `<name>_total`; prometheus_client adds that suffix itself.
_COUNTER_SUFFIX = "_total"


@dataclass
class Metric:
    name: str
    kind: str  # "counter" or "gauge"
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Checked here, where the metric is named, rather than failing a scrape later.
        if self.kind not in ("counter", "gauge"):
            raise ValueError(f"metric {self.name}: kind must be 'counter' or 'gauge', not {self.kind!r}")
        if self.kind == "counter" and not self.name.endswith(_COUNTER_SUFFIX):
            raise ValueError(f"counter {self.name} must be named ..._total")

    def add(self, value: float, **labels: str) -> Metric:
        self.samples.append((labels, value))
        return self

    def family(self) -> MetricFamily:
        """The metric as prometheus_client's metric family, samples and all."""
        if self.kind == "counter":
            counter = CounterMetricFamily(self.name, self.help)
            for labels, value in self.samples:
                counter.add_sample(self.name, labels, value)
            return counter
        gauge = GaugeMetricFamily(self.name, self.help)
        for labels, value in self.samples:
            gauge.add_sample(self.name, labels, value)
        return gauge


class _Scrape(Collector):
    """One scrape's metrics, as a collector."""

    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[MetricFamily]:
        for metric in self._metrics:
            yield metric.family()


def render(metrics: list[Metric]) -> bytes:
    """The Prometheus text exposition (format 0.0.4) of `metrics`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Scrape(metrics))
    return generate_latest(registry)
