"""A key's scope as every route narrows its filters with it: cities, domains and areas."""

from __future__ import annotations

from api.auth import Principal


def test_areas_narrow_an_area_filter_and_never_widen_it() -> None:
    everyone = Principal(name="admin", role="admin")
    ward = Principal(name="UBND phường", role="operator", areas=frozenset({"hp.ward.le-chan"}))
    assert everyone.area_filter(None) is None
    assert everyone.area_filter(["hp.ward.an-bien"]) == ["hp.ward.an-bien"]
    assert ward.area_filter(None) == ["hp.ward.le-chan"]
    assert ward.area_filter(["hp.ward.le-chan", "hp.ward.an-bien"]) == ["hp.ward.le-chan"]
    assert ward.area_filter(["hp.ward.an-bien"]) == []


def test_an_object_is_seen_by_a_ward_key_when_it_lies_in_one_of_its_areas() -> None:
    ward = Principal(name="UBND phường", role="viewer", areas=frozenset({"hp.ward.le-chan"}))
    assert ward.sees_areas(["hp.catchment.tam-bac", "hp.ward.le-chan"])
    assert not ward.sees_areas(["hp.ward.an-bien"])
    assert not ward.sees_areas([])
    assert not ward.sees_areas(None)
    assert Principal(name="admin", role="admin").sees_areas(None)


def test_keys_of_other_areas_share_no_cached_view() -> None:
    one = Principal(name="a", role="viewer", areas=frozenset({"x"}))
    other = Principal(name="b", role="viewer", areas=frozenset({"y"}))
    assert one.scope_key != other.scope_key != Principal(name="c", role="viewer").scope_key
