"""Alarm rules: severities, the domains' defaults, device overrides and their validation."""

from __future__ import annotations

import typing

import pytest
from pydantic import ValidationError

from ioc_core.domains import DOMAINS
from ioc_core.models import DeviceIn, ThresholdKey
from ioc_core.places import city_name, place_label
from ioc_core.rules import (
    RULE_KEYS,
    SEVERITIES,
    MetricRules,
    rule_value_problem,
    rules_for,
    severity_rank,
    worst_severity,
)


def test_severities_are_ordered() -> None:
    assert SEVERITIES == ("low", "medium", "high", "critical")
    assert [severity_rank(s) for s in SEVERITIES] == [0, 1, 2, 3]
    assert severity_rank(None) == severity_rank("bogus") == -1
    assert worst_severity("medium", "critical") == worst_severity("critical", "medium") == "critical"
    assert worst_severity(None, "low") == "low"
    assert worst_severity("high", None) == "high"


def test_the_api_accepts_exactly_the_rule_keys() -> None:
    assert set(typing.get_args(ThresholdKey)) == set(RULE_KEYS)


def test_overrides_apply_key_by_key_and_null_switches_off() -> None:
    defaults = MetricRules(warn_above=3.0, crit_above=4.5, hysteresis=0.1, zscore=6.0)
    rules = defaults.overridden({"warn_above": 2.5, "zscore": None})
    assert rules == MetricRules(warn_above=2.5, crit_above=4.5, hysteresis=0.1, zscore=None)
    assert not rules.has_zscore and rules.has_limits


def test_overrides_ignore_what_this_version_cannot_read() -> None:
    defaults = MetricRules(warn_above=3.0)
    stored_long_ago = {"too_high": 1.0, "warn_above": "high", "hysteresis": -1.0, "crit_above": True}
    assert defaults.overridden(stored_long_ago) == defaults


def test_rules_for_covers_every_metric_of_the_domain() -> None:
    flood = DOMAINS["flood"]
    rules = rules_for(flood, {"currentLevel": {"warn_above": 2.0}, "voltage": {"warn_above": 1.0}})
    assert set(rules) == {m.name for m in flood.metrics}
    assert rules["currentLevel"].warn_above == 2.0
    assert rules["currentLevel"].crit_above == flood.default_rules["currentLevel"].crit_above
    assert rules["batteryLevel"].warn_below is not None


@pytest.mark.parametrize("name", sorted(DOMAINS))
def test_domain_defaults_are_coherent(name: str) -> None:
    domain = DOMAINS[name]
    for metric in domain.metrics:
        assert metric.label_en and metric.label_vi, metric.name
    for metric_name, rules in domain.default_rules.items():
        described = domain.metric(metric_name)
        assert described is not None
        for key, value in rules.as_dict().items():
            assert rule_value_problem(key, value) is None, (metric_name, key)
        for limit in (rules.warn_above, rules.crit_above, rules.warn_below, rules.crit_below):
            assert limit is None or described.minimum <= limit <= described.maximum
        if rules.warn_above is not None and rules.crit_above is not None:
            assert rules.warn_above < rules.crit_above
        if rules.warn_below is not None and rules.crit_below is not None:
            assert rules.warn_below > rules.crit_below
        if rules.has_limits:
            assert rules.hysteresis is not None and rules.hysteresis > 0, metric_name


def test_flatline_only_where_a_signal_never_sits_still() -> None:
    with_flatline = {
        (domain.name, metric)
        for domain in DOMAINS.values()
        for metric, rules in domain.default_rules.items()
        if rules.has_flatline
    }
    assert with_flatline == {
        ("grid", "voltage"),
        ("grid", "frequency"),
        ("water", "pressure"),
        ("flood", "currentLevel"),
    }
    assert not DOMAINS["flood"].default_rules["rainfall"].has_zscore
    assert not DOMAINS["waste"].default_rules["fillingLevel"].has_zscore


def test_only_flood_correlates_districts() -> None:
    assert [d.name for d in DOMAINS.values() if d.correlation is not None] == ["flood"]


def device(thresholds: object) -> DeviceIn:
    return DeviceIn.model_validate(
        {
            "id": "hn-flood-001",
            "city": "ha-noi",
            "domain": "flood",
            "location": {"lat": 21.04, "lon": 105.84},
            "thresholds": thresholds,
        }
    )


def test_devices_may_set_any_rule_key_or_null() -> None:
    given = {
        "currentLevel": {"warn_above": 3.0, "crit_above": 4.5, "zscore": None, "rise_above": 0.3},
        "rainfall": {"hysteresis": 2, "flatline_s": None},
    }
    stored = device(given)
    assert stored.model_dump(mode="json")["thresholds"] == given


@pytest.mark.parametrize(
    "thresholds",
    [
        {"currentLevel": {"warn_above": float("inf")}},
        {"currentLevel": {"hysteresis": -0.1}},
        {"currentLevel": {"zscore": 0}},
        {"currentLevel": {"rate_window_s": -60}},
        {"currentLevel": {"too_high": 1}},
        {"voltage": {"warn_above": 1}},
    ],
)
def test_unusable_settings_are_refused(thresholds: object) -> None:
    with pytest.raises(ValidationError):
        device(thresholds)


def test_places_read_as_vietnamese_names() -> None:
    assert city_name("ha-noi") == "Hà Nội"
    assert city_name("ho-chi-minh") == "Hồ Chí Minh"
    assert city_name("vinh") == "vinh"
    assert (
        place_label(name="Trạm Phan Đình Phùng", fallback="x", district="Ba Đình", city="ha-noi")
        == "Trạm Phan Đình Phùng (Ba Đình, Hà Nội)"
    )
    assert place_label(name=None, fallback="dn-w-7", district=None, city="da-nang") == "dn-w-7 (Đà Nẵng)"
