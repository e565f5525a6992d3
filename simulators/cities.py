"""Where simulated devices stand: city districts with real centre coordinates (WGS 84)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class District:
    name: str
    lat: float
    lon: float


CITIES: dict[str, tuple[District, ...]] = {
    "ha-noi": (
        District("Hoàn Kiếm", 21.0287, 105.8524),
        District("Ba Đình", 21.0340, 105.8140),
        District("Đống Đa", 21.0128, 105.8270),
        District("Hai Bà Trưng", 21.0058, 105.8573),
        District("Cầu Giấy", 21.0362, 105.7906),
        District("Thanh Xuân", 20.9936, 105.8113),
        District("Hoàng Mai", 20.9742, 105.8636),
        District("Long Biên", 21.0470, 105.8930),
    ),
    "hai-phong": (
        District("Hồng Bàng", 20.8631, 106.6720),
        District("Lê Chân", 20.8520, 106.6830),
        District("Ngô Quyền", 20.8560, 106.7020),
        District("Hải An", 20.8300, 106.7300),
        District("Kiến An", 20.8090, 106.6290),
    ),
    "quang-ninh": (
        District("Hạ Long", 20.9517, 107.0806),
        District("Cẩm Phả", 21.0167, 107.2833),
        District("Uông Bí", 21.0333, 106.7833),
        District("Móng Cái", 21.5244, 107.9653),
    ),
    "da-nang": (
        District("Hải Châu", 16.0471, 108.2068),
        District("Thanh Khê", 16.0640, 108.1870),
        District("Sơn Trà", 16.0860, 108.2440),
        District("Liên Chiểu", 16.0750, 108.1500),
    ),
}
