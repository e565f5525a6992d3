"""Rules at run time, the pure part: layers of overrides laid over a domain's defaults key by key
in precedence order, where each value comes from, and the checks an override gets."""

from __future__ import annotations

from ioc_core.domains import DOMAINS
from ioc_core.rules import (
    RuleLayer,
    device_layers,
    layered_rules,
    rule_sources,
    rules_for,
    settings_problems,
)
from processors.detection import DeviceProfile

FLOOD = DOMAINS["flood"]


def test_without_layers_the_rules_are_the_domain_defaults() -> None:
    assert layered_rules(FLOOD, []) == rules_for(FLOOD, {})


def test_later_layers_win_key_by_key_and_null_switches_a_rule_off() -> None:
    layers = [
        RuleLayer("city", {"currentLevel": {"warn_above": 2.0, "crit_above": 4.0}}),
        RuleLayer("area:ward-1", {"currentLevel": {"warn_above": 2.5}}),
        RuleLayer("device", {"currentLevel": {"zscore": None}}),
    ]
    rules = layered_rules(FLOOD, layers)["currentLevel"]
    assert (rules.warn_above, rules.crit_above, rules.zscore) == (2.5, 4.0, None)
    # Untouched keys keep the domain's defaults.
    assert rules.hysteresis == FLOOD.default_rules["currentLevel"].hysteresis

    sources = rule_sources(FLOOD, layers)["currentLevel"]
    assert sources["warn_above"].value == 2.5 and sources["warn_above"].source == "area:ward-1"
    assert sources["crit_above"].source == "city"
    assert sources["zscore"].value is None and sources["zscore"].source == "device"
    assert sources["hysteresis"].source == "domain"
    assert rule_sources(FLOOD, layers)["rainfall"]["warn_above"].source == "domain"


def test_the_device_s_override_wins_over_its_thresholds_which_win_over_areas() -> None:
    overrides = [
        RuleLayer("city", {"currentLevel": {"warn_above": 1.0}}),
        RuleLayer("area:ward-1", {"currentLevel": {"warn_above": 1.5, "crit_above": 3.5}}),
        RuleLayer("device", {"currentLevel": {"crit_above": 3.9}}),
    ]
    thresholds = {"currentLevel": {"warn_above": 2.2, "crit_above": 3.0}}
    layers = device_layers(overrides, thresholds)
    assert [layer.source for layer in layers] == ["city", "area:ward-1", "thresholds", "device"]
    sources = rule_sources(FLOOD, layers)["currentLevel"]
    assert (sources["warn_above"].value, sources["warn_above"].source) == (2.2, "thresholds")
    assert (sources["crit_above"].value, sources["crit_above"].source) == (3.9, "device")


def test_values_that_are_not_rules_are_ignored_as_the_processor_ignores_them() -> None:
    layers = [RuleLayer("city", {"currentLevel": {"warn_above": "3", "zscore": -1.0, "unknown": 1.0}})]
    assert layered_rules(FLOOD, layers) == rules_for(FLOOD, {})
    assert rule_sources(FLOOD, layers)["currentLevel"]["warn_above"].source == "domain"


def test_an_override_is_checked_as_device_thresholds_are() -> None:
    problems = settings_problems(
        FLOOD, {"pressure": {"warn_above": 1.0}, "currentLevel": {"zscore": 0.0}}, name="rules"
    )
    assert problems == [
        (("pressure",), "rules name 'pressure', not a flood metric"),
        (("currentLevel", "zscore"), "rules.currentLevel.zscore must be greater than 0"),
    ]
    assert settings_problems(FLOOD, {"currentLevel": {"warn_above": 2.0}}) == []


def test_devices_with_the_same_overrides_and_no_settings_of_their_own_share_one_rules_mapping() -> None:
    city = (RuleLayer("city", {"currentLevel": {"warn_above": 2.0}}),)

    def profile(device_id: str, thresholds: dict[str, dict[str, float | None]]) -> DeviceProfile:
        return DeviceProfile.of(
            id=device_id,
            city="ha-noi",
            domain="flood",
            name=None,
            district=None,
            thresholds=thresholds,
            overrides=city,
        )

    first, second = profile("a", {}), profile("b", {})
    assert first.rules is second.rules
    assert first.rules["currentLevel"].warn_above == 2.0
    own = profile("c", {"currentLevel": {"crit_above": 4.0}})
    assert own.rules is not first.rules
    assert (own.rules["currentLevel"].warn_above, own.rules["currentLevel"].crit_above) == (2.0, 4.0)
    # Without overrides, the domain's one mapping, as before.
    plain = DeviceProfile.of(id="d", city="ha-noi", domain="flood", name=None, district=None, thresholds={})
    assert (
        plain.rules
        is DeviceProfile.of(
            id="e", city="ha-noi", domain="flood", name=None, district=None, thresholds={}
        ).rules
    )
