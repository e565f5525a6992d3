"""What detection concludes: findings (`ioc_core.alarms.Finding`), one per (subject, rule) and batch,
that the alarm store turns into raised, repeated and resolved alarms."""

from __future__ import annotations

import math
from datetime import datetime

from ioc_core.alarms import OFFLINE_RULE, Finding
from ioc_core.domains import get_domain
from ioc_core.domains.base import Metric
from processors.detection.messages import offline_texts
from processors.detection.profile import DeviceProfile

OFFLINE_SEVERITY = "medium"

__all__ = ["OFFLINE_RULE", "OFFLINE_SEVERITY", "Finding", "metric_of", "offline_finding"]


def metric_of(profile: DeviceProfile, name: str) -> Metric:
    """The metric's description for messages; a metric the domain does not describe reads as its name."""
    domain = get_domain(profile.domain)
    metric = domain.metric(name) if domain is not None else None
    if metric is None:
        return Metric(name, "", -math.inf, math.inf, name, label_en=name, label_vi=name)
    return metric


def offline_finding(profile: DeviceProfile, *, at: datetime, active: bool) -> Finding:
    """The device went silent or said it is offline (`active`), or it is back (not `active`)."""
    message_vi, message_en = offline_texts(profile.place, active=active)
    return Finding(
        subject=profile.id,
        device_id=profile.id,
        city=profile.city,
        domain=profile.domain,
        district=profile.district,
        rule=OFFLINE_RULE,
        metric=None,
        active=active,
        severity=OFFLINE_SEVERITY if active else None,
        value=None,
        threshold=None,
        repeats=1 if active else 0,
        at=at,
        message_vi=message_vi,
        message_en=message_en,
    )
