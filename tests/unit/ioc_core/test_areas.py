"""Reading GeoJSON features as areas: what is taken, how it is normalised, and what is refused
with a message naming the feature."""

from __future__ import annotations

from typing import Any

import pytest
import shapely

from ioc_core.areas import AreaError, parse_collection, parse_feature


def _box(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def _feature(geometry: dict[str, Any], **properties: Any) -> dict[str, Any]:
    return {
        "type": "Feature",
        "id": "hp-ward",
        "geometry": geometry,
        "properties": {"name_vi": "Phường Lê Chân", "kind": "ward", "city": "hai-phong", **properties},
    }


def test_a_polygon_is_stored_as_a_counter_clockwise_multipolygon() -> None:
    clockwise = _feature({"type": "Polygon", "coordinates": [_box(106.6, 20.8, 106.7, 20.9)[::-1]]})
    area = parse_feature(clockwise)
    assert area.geometry["type"] == "MultiPolygon"
    assert shapely.is_ccw(area.shape().geoms[0].exterior)
    assert area.bbox == pytest.approx((106.6, 20.8, 106.7, 20.9))
    assert area.vertices == 5
    assert (area.id, area.name_en, area.code, area.parent) == ("hp-ward", None, None, None)


def test_holes_are_made_clockwise_and_other_properties_kept() -> None:
    with_hole = _feature(
        {"type": "Polygon", "coordinates": [_box(0, 0, 10, 10), _box(4, 4, 6, 6)]},
        source="survey",
        population=52_000,
    )
    area = parse_feature(with_hole)
    assert not shapely.is_ccw(area.shape().geoms[0].interiors[0])
    assert area.extra == {"source": "survey", "population": 52_000}


def test_the_path_id_wins_and_must_agree_with_the_feature() -> None:
    feature = _feature({"type": "Polygon", "coordinates": [_box(0, 0, 1, 1)]})
    assert parse_feature({**feature, "id": None}, area_id="from-path").id == "from-path"
    with pytest.raises(AreaError, match="is not the area's id"):
        parse_feature(feature, area_id="another")


@pytest.mark.parametrize(
    ("geometry", "properties", "problem"),
    [
        ({"type": "Polygon", "coordinates": [_box(0, 0, 1, 1)]}, {"kind": "district"}, "kind must be one of"),
        ({"type": "Polygon", "coordinates": [_box(0, 0, 1, 1)]}, {"city": "Hải Phòng"}, "properties.city"),
        ({"type": "Polygon", "coordinates": [_box(0, 0, 1, 1)]}, {"parent": "hp-ward"}, "its own parent"),
        ({"type": "Polygon", "coordinates": [_box(0, 0, 1, 1)]}, {"big": 2**70}, "JSON cannot carry"),
        (
            {"type": "Polygon", "coordinates": [_box(0, 0, 1, 1)]},
            {"note": "x" * 9000},
            "more than 8192 bytes",
        ),
        (
            {"type": "MultiPolygon", "coordinates": [[_box(0, 0, 2, 2)], [_box(1, 1, 3, 3)]]},
            {},
            "geometry is not valid: Self-intersection",
        ),
        (
            {"type": "Polygon", "coordinates": [_box(0, 0, 1, 1), _box(5, 5, 6, 6)]},
            {},
            "geometry is not valid: Hole lies outside shell",
        ),
        (
            {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], ["a", 1], [0, 0]]]},
            {},
            "not [longitude, latitude]",
        ),
        (
            {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, True], [0, 0]]]},
            {},
            "not [longitude, latitude]",
        ),
        (
            {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, float("nan")], [0, 0]]]},
            {},
            "out of range",
        ),
        ({"type": "Polygon", "coordinates": []}, {}, "non-empty list of rings"),
        ({"type": "MultiPolygon", "coordinates": []}, {}, "non-empty list of polygons"),
        ({"type": "GeometryCollection", "geometries": []}, {}, "Polygon or MultiPolygon"),
    ],
)
def test_what_cannot_be_an_area_says_why(
    geometry: dict[str, Any], properties: dict[str, Any], problem: str
) -> None:
    with pytest.raises(AreaError, match=r"^feature 'hp-ward': ") as caught:
        parse_feature(_feature(geometry, **properties))
    assert problem in str(caught.value)


def test_a_vertex_limit() -> None:
    ring = [[0.001 * i, 0.0] for i in range(60)] + [[0.06, 0.01], [0.0, 0.01], [0.0, 0.0]]
    feature = _feature({"type": "Polygon", "coordinates": [ring]})
    assert parse_feature(feature, max_vertices=100).vertices == 63
    with pytest.raises(AreaError, match="more than 50 vertices"):
        parse_feature(feature, max_vertices=50)


def test_a_collection_names_features_by_position_and_refuses_what_is_not_one() -> None:
    good = _feature({"type": "Polygon", "coordinates": [_box(0, 0, 1, 1)]})
    nameless = {**good, "id": None}
    areas, errors = parse_collection({"type": "FeatureCollection", "features": [good, nameless, "x"]})
    assert [a.id for a in areas] == ["hp-ward"]
    assert [str(e) for e in errors] == [
        "feature #2: has no id (the Feature's `id` or `properties.id`)",
        'feature #3: must be a GeoJSON Feature ({"type": "Feature", ...})',
    ]
    with pytest.raises(Exception, match="FeatureCollection"):
        parse_collection({"type": "Feature"})
