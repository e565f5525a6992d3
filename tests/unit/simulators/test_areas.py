"""The simulated cities on the map of 1 July 2025: post-reform ward names, the former Hải Dương and
Quảng Nam places in Hải Phòng and Đà Nẵng, and the approximate areas each city ships (parsed as
the API parses them, with every simulated device in exactly one ward of its city)."""

from __future__ import annotations

import itertools
import re

import pytest
import shapely

from ioc_core.areas import AreaIn, parse_collection, parse_feature
from simulators.cities import CATCHMENTS, CITIES, CITY_BOUNDS, PROVINCES, ascii_name, city_areas, slug
from simulators.fleet import build_fleet

# Words of the district tier the 2025 reform abolished, and of the town and city tier under a
# province, as a place name would carry them.
_PRE_REFORM = re.compile(r"\b(quận|huyện|thị xã|thị trấn|district)\b", re.IGNORECASE)


def _areas(city: str, places: str | None = None) -> list[AreaIn]:
    return [parse_feature(feature) for feature in city_areas(city, places=places)]


def _of_kind(areas: list[AreaIn], kind: str) -> list[AreaIn]:
    return [area for area in areas if area.kind == kind]


def _covering(areas: list[AreaIn], lon: float, lat: float) -> list[str]:
    return [area.id for area in areas if shapely.intersects_xy(area.shape(), lon, lat)]


@pytest.mark.parametrize("city", sorted(CITIES))
def test_a_citys_areas_parse_as_the_api_parses_them(city: str) -> None:
    features = city_areas(city)
    areas, errors = parse_collection({"type": "FeatureCollection", "features": features})
    assert errors == [] and len(areas) == len(features)
    province, *rest = areas
    assert (province.id, province.kind, province.city) == (f"{city}.province", "province", city)
    assert (province.name_vi, province.code) == (PROVINCES[city].name_vi, PROVINCES[city].code)
    wards = _of_kind(areas, "ward")
    assert [ward.name_vi for ward in wards] == [f"Phường {ward.name}" for ward in CITIES[city]]
    assert {area.kind for area in rest} == {"ward", "catchment"}
    for area in areas:
        assert area.city == city and area.id.startswith(f"{city}.")
        # Generated, and saying so: no official code on a ward or catchment.
        assert area.extra["approximate"] is True and "generated" in area.extra["source"], area.id
        if area.kind != "province":
            assert area.parent == province.id and area.code is None, area.id
    for ward in wards:
        assert re.fullmatch(rf"{city}\.ward\.[a-z0-9-]+", ward.id) and ward.name_en, ward.id
    assert len({area.id for area in areas}) == len(areas)


def test_ids_are_stable_and_readable() -> None:
    ids = {feature["id"] for feature in city_areas("hai-phong")}
    assert {"hai-phong.province", "hai-phong.ward.le-chan", "hai-phong.catchment.tam-bac"} <= ids
    assert slug("Văn Miếu – Quốc Tử Giám") == "van-mieu-quoc-tu-giam"
    assert slug("Móng Cái 1") == "mong-cai-1"
    assert ascii_name("Đống Đa") == "Dong Da"


@pytest.mark.parametrize("city", sorted(CITIES))
def test_wards_tile_the_province_without_overlapping(city: str) -> None:
    areas = _areas(city)
    [province] = _of_kind(areas, "province")
    wards = [ward.shape() for ward in _of_kind(areas, "ward")]
    union = shapely.union_all(wards)
    assert shapely.symmetric_difference(union, province.shape()).area < 1e-9
    for one, other in itertools.combinations(wards, 2):
        assert shapely.intersection(one, other).area < 1e-9
    # The city stays within its bounds.
    bounds = CITY_BOUNDS[city]
    west, south, east, north = province.bbox
    assert bounds.west <= west and bounds.south <= south and east <= bounds.east and north <= bounds.north


@pytest.mark.parametrize("city", sorted(CITIES))
def test_every_device_lies_in_exactly_one_ward_of_its_city_and_in_its_province(city: str) -> None:
    areas = _areas(city)
    wards = {area.name_vi: area for area in _of_kind(areas, "ward")}
    [province] = _of_kind(areas, "province")
    catchments = _of_kind(areas, "catchment")
    # Enough devices for every ward to have all five domains, twice over.
    fleet = build_fleet(city, 10 * len(CITIES[city]) * 2)
    assert {device.district for device in fleet} == {ward.name for ward in CITIES[city]}
    for device in fleet:
        [ward] = _covering(list(wards.values()), device.lon, device.lat)
        assert ward == wards[f"Phường {device.district}"].id, (device.id, device.district)
        assert _covering([province], device.lon, device.lat) == [province.id], device.id
        # Every device (its flood stations above all) lies in one catchment.
        assert len(_covering(catchments, device.lon, device.lat)) == 1, device.id


def test_every_ward_is_in_exactly_one_catchment() -> None:
    for city, wards in CITIES.items():
        gathered = [name for catchment in CATCHMENTS[city] for name in catchment.wards]
        assert sorted(gathered) == sorted(ward.name for ward in wards), city


def test_every_place_lies_in_its_own_ward() -> None:
    for city in CITIES:
        wards = {area.name_vi: area for area in _of_kind(_areas(city), "ward")}
        for ward in CITIES[city]:
            mine = wards[ward.title]
            for lat, lon in [(ward.lat, ward.lon), *((site.lat, site.lon) for site in ward.sites)]:
                assert _covering(list(wards.values()), lon, lat) == [mine.id], (city, ward.name, lat, lon)


def test_neighbouring_cities_do_not_overlap() -> None:
    provinces = {city: _of_kind(_areas(city), "province")[0].shape() for city in CITIES}
    for one, other in itertools.combinations(provinces, 2):
        assert shapely.intersection(provinces[one], provinces[other]).area < 1e-9, (one, other)
    # So no device of one city lies in another's areas.
    for city in CITIES:
        for device in build_fleet(city, 100):
            for other, shape in provinces.items():
                if other != city:
                    assert not shapely.intersects_xy(shape, device.lon, device.lat), (device.id, other)


def test_place_names_are_those_of_the_2025_map() -> None:
    for city, wards in CITIES.items():
        for ward in wards:
            assert not _PRE_REFORM.search(ward.name) and ward.unit in ("phường", "xã", "đặc khu"), ward
            for site in ward.sites:
                assert not _PRE_REFORM.search(site.name), (city, site.name)
        for feature in city_areas(city):
            for key in ("name_vi", "name_en"):
                assert not _PRE_REFORM.search(feature["properties"][key]), feature["id"]
    for device in build_fleet("ha-noi", 200):
        assert not _PRE_REFORM.search(device.district) and not _PRE_REFORM.search(device.name)
    hanoi = {ward.name for ward in CITIES["ha-noi"]}
    assert {"Ba Đình", "Hoàn Kiếm", "Cửa Nam", "Hai Bà Trưng", "Đống Đa", "Cầu Giấy", "Tây Hồ"} <= hanoi
    assert {"Long Biên", "Hoàng Mai", "Thanh Xuân"} <= hanoi


def test_hai_phong_takes_in_the_former_hai_duong_province() -> None:
    wards = {ward.name: ward for ward in CITIES["hai-phong"]}
    assert {"Hồng Bàng", "Lê Chân", "Ngô Quyền", "Hải An", "Kiến An", "Đồ Sơn", "Thủy Nguyên"} <= set(wards)
    former = [wards[name] for name in ("Hải Dương", "Thành Đông", "Lê Thanh Nghị")]
    for ward in former:
        # The former province's capital, some 35 km west of Hải Phòng's centre.
        assert abs(ward.lat - 20.94) < 0.03 and abs(ward.lon - 106.33) < 0.05, ward.name
        assert CITY_BOUNDS["hai-phong"].contains(ward.lat, ward.lon)
    areas = {area.name_vi: area for area in _of_kind(_areas("hai-phong"), "ward")}
    assert "Phường Hải Dương" in areas
    # A large enough fleet stands there too.
    fleet = build_fleet("hai-phong", 10 * len(wards))
    assert {"Hải Dương", "Thành Đông", "Lê Thanh Nghị"} <= {device.district for device in fleet}


def test_da_nang_takes_in_the_former_quang_nam_province() -> None:
    wards = {ward.name: ward for ward in CITIES["da-nang"]}
    assert {"Hải Châu", "Thanh Khê", "Sơn Trà", "An Hải", "Ngũ Hành Sơn", "Liên Chiểu", "Hòa Khánh"} <= set(
        wards
    )
    assert {"Hòa Cường", "Cẩm Lệ"} <= set(wards)
    for name, (lat, lon) in {"Hội An": (15.88, 108.33), "Tam Kỳ": (15.57, 108.48)}.items():
        ward = wards[name]
        assert abs(ward.lat - lat) < 0.03 and abs(ward.lon - lon) < 0.03, name
        assert CITY_BOUNDS["da-nang"].contains(ward.lat, ward.lon)
    fleet = build_fleet("da-nang", 10 * len(wards))
    assert {"Hội An", "Tam Kỳ"} <= {device.district for device in fleet}


def test_a_fleet_laid_on_another_map_gets_that_maps_areas_under_its_own_city() -> None:
    areas = _areas("test-city", places="hai-phong")
    assert all(area.city == "test-city" and area.id.startswith("test-city.") for area in areas)
    wards = _of_kind(areas, "ward")
    assert len(wards) == len(CITIES["hai-phong"])
    for device in build_fleet("test-city", 40, places="hai-phong"):
        assert len(_covering(wards, device.lon, device.lat)) == 1, device.id
    with pytest.raises(ValueError, match="no map"):
        city_areas("test-city")
