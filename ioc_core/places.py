"""How places read in operator messages: city slugs as their Vietnamese names."""

from __future__ import annotations

CITY_NAMES: dict[str, str] = {
    "ha-noi": "Hà Nội",
    "hai-phong": "Hải Phòng",
    "quang-ninh": "Quảng Ninh",
    "da-nang": "Đà Nẵng",
    "ho-chi-minh": "Hồ Chí Minh",
    "can-tho": "Cần Thơ",
}


def city_name(slug: str) -> str:
    """The city's display name; a city without one in the table reads as its slug."""
    return CITY_NAMES.get(slug, slug)


def place_label(*, name: str | None, fallback: str, district: str | None, city: str) -> str:
    """`Trạm Phan Đình Phùng (Ba Đình, Hà Nội)`: the device's name (or `fallback`, its id, when it
    has none) with its district and city."""
    where = f"{district}, {city_name(city)}" if district else city_name(city)
    return f"{name or fallback} ({where})"
