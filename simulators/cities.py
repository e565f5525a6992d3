"""Where simulated devices stand: the wards of four cities on the map of 1 July 2025 (two tiers:
provinces and centrally-run cities over wards, communes and special zones; no districts), with
their real arterial roads, rivers and canals, flood-prone streets, markets, substations and water
works (WGS 84, to within a few hundred metres).

A domain names the kinds of place its devices stand at (`Domain.sites`); the fleet puts each
device at one such place of its ward, or around the ward's centre where there is none, and
always inside the ward's generated polygon.

`city_areas` gives each map's areas as GeoJSON Features: a province, its wards and a few drainage
catchments. They are generated from the places below (Voronoi cells of every ward's centre and
places, merged per ward and cut to the city's bounds), not official boundaries, and say so in
their properties; real boundaries come in through `ioc areas import`.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shapely.geometry import MultiPolygon, Polygon
    from shapely.geometry.base import BaseGeometry

ROAD = "road"
RIVER = "river"
LOW_STREET = "low_street"
MARKET = "market"
SUBSTATION = "substation"
WATER_WORKS = "water_works"
SITE_KINDS = (ROAD, RIVER, LOW_STREET, MARKET, SUBSTATION, WATER_WORKS)

WARD, COMMUNE, SPECIAL_ZONE = "phường", "xã", "đặc khu"
_UNITS_EN = {WARD: "Ward", COMMUNE: "Commune", SPECIAL_ZONE: "Special Zone"}


@dataclass(frozen=True)
class Site:
    name: str
    kind: str
    lat: float
    lon: float
    # Where the place itself decides how its devices behave, their phase (see `Sampler`): for a water
    # level, how far the sea's tide reaches it (0 an inland canal, 1 a river mouth). None: by chance.
    phase: float | None = None


@dataclass(frozen=True)
class Ward:
    """A ward (phường), commune (xã) or special zone (đặc khu) as the 2025 reform made it: its name
    without the title, a point near its centre, and its places."""

    name: str
    lat: float
    lon: float
    sites: tuple[Site, ...] = ()
    unit: str = WARD

    def sites_of(self, kind: str) -> tuple[Site, ...]:
        return tuple(site for site in self.sites if site.kind == kind)

    @property
    def title(self) -> str:
        return f"{self.unit.capitalize()} {self.name}"


@dataclass(frozen=True)
class Bounds:
    south: float
    west: float
    north: float
    east: float

    def contains(self, lat: float, lon: float) -> bool:
        return self.south <= lat <= self.north and self.west <= lon <= self.east


@dataclass(frozen=True)
class Province:
    """A province or centrally-run city: its names and the statistics office's 2-digit code."""

    name_vi: str
    name_en: str
    code: str


@dataclass(frozen=True)
class Catchment:
    """A drainage catchment (lưu vực), as the wards it gathers."""

    key: str
    name_vi: str
    name_en: str
    wards: tuple[str, ...]


def _road(name: str, lat: float, lon: float) -> Site:
    return Site(name, ROAD, lat, lon)


def _river(name: str, lat: float, lon: float, tide: float) -> Site:
    return Site(name, RIVER, lat, lon, phase=tide)


def _low(name: str, lat: float, lon: float, tide: float = 0.0) -> Site:
    return Site(name, LOW_STREET, lat, lon, phase=tide)


def _market(name: str, lat: float, lon: float) -> Site:
    return Site(name, MARKET, lat, lon)


def _substation(name: str, lat: float, lon: float) -> Site:
    return Site(name, SUBSTATION, lat, lon)


def _works(name: str, lat: float, lon: float) -> Site:
    return Site(name, WATER_WORKS, lat, lon)


PROVINCES: dict[str, Province] = {
    "ha-noi": Province("Thành phố Hà Nội", "Hanoi", "01"),
    "hai-phong": Province("Thành phố Hải Phòng", "Hai Phong City", "31"),
    "quang-ninh": Province("Tỉnh Quảng Ninh", "Quang Ninh Province", "22"),
    "da-nang": Province("Thành phố Đà Nẵng", "Da Nang City", "48"),
}

# The part of each city its fleets cover (the generated areas are cut to it). Hải Phòng reaches
# west to the former Hải Dương province's capital, Đà Nẵng south to the former Quảng Nam's Hội An
# and Tam Kỳ.
CITY_BOUNDS: dict[str, Bounds] = {
    "ha-noi": Bounds(20.93, 105.74, 21.10, 105.95),
    "hai-phong": Bounds(20.68, 106.25, 21.00, 106.84),
    "quang-ninh": Bounds(20.88, 106.70, 21.58, 108.02),
    "da-nang": Bounds(15.50, 108.10, 16.15, 108.55),
}

# Each city's wards, in the order fleets fill them: a small fleet stands in the first few.
CITIES: dict[str, tuple[Ward, ...]] = {
    # The Red River barely feels the tide at Hà Nội; the canals (Tô Lịch, Kim Ngưu, Lừ, Sét) drain
    # the city to the Yên Sở pumping station.
    "ha-noi": (
        Ward(
            "Hai Bà Trưng",
            21.0125,
            105.8555,
            (
                _road("Lò Đúc", 21.0145, 105.8590),
                _river("Sông Kim Ngưu – Lò Đúc", 21.0100, 105.8625, tide=0.0),
                _market("Chợ Hôm", 21.0155, 105.8515),
                _works("Nhà máy nước Lương Yên", 21.0145, 105.8625),
            ),
        ),
        Ward(
            "Văn Miếu – Quốc Tử Giám",
            21.0280,
            105.8355,
            (
                _road("Nguyễn Thái Học", 21.0295, 105.8405),
                _low("Nguyễn Khuyến", 21.0280, 105.8375),
                _substation("TBA 110kV Giám", 21.0245, 105.8330),
                _works("Nhà máy nước Ngô Sỹ Liên", 21.0265, 105.8395),
            ),
        ),
        Ward(
            "Khương Đình",
            20.9885,
            105.8165,
            (
                _road("Nguyễn Xiển", 20.9820, 105.8070),
                _river("Sông Tô Lịch – Khương Đình", 20.9930, 105.8175, tide=0.0),
                _low("Nguyễn Xiển – Kim Giang", 20.9840, 105.8100),
                _works("Nhà máy nước Hạ Đình", 20.9870, 105.8130),
            ),
        ),
        Ward(
            "Hoàng Mai",
            20.9815,
            105.8630,
            (
                _road("Tam Trinh", 20.9830, 105.8665),
                _road("Lĩnh Nam", 20.9860, 105.8750),
                _river("Sông Kim Ngưu – Tam Trinh", 20.9850, 105.8645, tide=0.0),
                _market("Chợ Đền Lừ", 20.9875, 105.8580),
            ),
        ),
        Ward(
            "Hoàn Kiếm",
            21.0287,
            105.8524,
            (
                _road("Tràng Tiền – Hàng Bài", 21.0245, 105.8535),
                _road("Trần Quang Khải", 21.0300, 105.8575),
                _market("Chợ Đồng Xuân", 21.0380, 105.8495),
                _substation("TBA 110kV Trần Hưng Đạo", 21.0195, 105.8560),
                _works("Nhà máy nước Đồn Thủy", 21.0215, 105.8600),
            ),
        ),
        Ward(
            "Thanh Xuân",
            20.9985,
            105.8065,
            (
                _road("Nguyễn Trãi", 20.9960, 105.8085),
                _road("Khuất Duy Tiến", 20.9975, 105.7995),
                _road("Lê Văn Lương", 21.0045, 105.8060),
                _market("Chợ Thượng Đình", 20.9990, 105.8150),
                _substation("TBA 110kV Thượng Đình", 20.9975, 105.8140),
            ),
        ),
        Ward(
            "Tương Mai",
            20.9895,
            105.8485,
            (
                _road("Giải Phóng – Giáp Bát", 20.9805, 105.8415),
                _river("Sông Sét – Giáp Bát", 20.9860, 105.8460, tide=0.0),
                _low("Giải Phóng – Kim Đồng", 20.9850, 105.8415),
                _works("Nhà máy nước Tương Mai", 20.9880, 105.8505),
            ),
        ),
        Ward(
            "Cầu Giấy",
            21.0335,
            105.7925,
            (
                _road("Xuân Thủy", 21.0365, 105.7870),
                _road("Cầu Giấy", 21.0330, 105.7985),
                _river("Sông Tô Lịch – cầu Giấy", 21.0325, 105.8020, tide=0.0),
                _works("Nhà máy nước Mai Dịch", 21.0385, 105.7760),
            ),
        ),
        Ward(
            "Bồ Đề",
            21.0425,
            105.8745,
            (
                _road("Nguyễn Văn Cừ", 21.0440, 105.8760),
                _river("Sông Hồng – Bồ Đề", 21.0380, 105.8665, tide=0.12),
                _low("Ngọc Lâm", 21.0455, 105.8720),
                _market("Chợ Gia Lâm", 21.0480, 105.8800),
                _substation("TBA 110kV Gia Lâm", 21.0440, 105.8830),
                _works("Nhà máy nước Gia Lâm", 21.0510, 105.8800),
            ),
        ),
        Ward(
            "Kim Liên",
            21.0085,
            105.8365,
            (
                _road("Xã Đàn", 21.0140, 105.8360),
                _road("Giải Phóng – Kim Liên", 21.0065, 105.8415),
                _river("Sông Lừ – Trung Tự", 21.0070, 105.8330, tide=0.0),
                _market("Chợ Kim Liên", 21.0085, 105.8385),
            ),
        ),
        Ward(
            "Ba Đình",
            21.0368,
            105.8346,
            (_works("Nhà máy nước Yên Phụ", 21.0455, 105.8445),),
        ),
        Ward(
            "Cửa Nam",
            21.0255,
            105.8460,
            (
                _road("Trần Hưng Đạo", 21.0205, 105.8500),
                _low("Phan Bội Châu", 21.0240, 105.8445),
            ),
        ),
        Ward(
            "Hồng Hà",
            21.0400,
            105.8560,
            (
                _river("Sông Hồng – bến Phúc Tân", 21.0345, 105.8592, tide=0.12),
                _river("Sông Hồng – Phúc Xá", 21.0490, 105.8485, tide=0.12),
            ),
        ),
        Ward(
            "Bạch Mai",
            21.0015,
            105.8480,
            (
                _road("Bạch Mai", 21.0040, 105.8505),
                _road("Đại Cồ Việt", 21.0075, 105.8470),
                _low("Bạch Mai – Minh Khai", 20.9980, 105.8510),
                _market("Chợ Mơ", 20.9965, 105.8525),
            ),
        ),
        Ward(
            "Vĩnh Tuy",
            21.0005,
            105.8715,
            (
                _road("Minh Khai", 20.9975, 105.8620),
                _river("Sông Hồng – Vĩnh Tuy", 21.0055, 105.8760, tide=0.12),
                _substation("TBA 110kV Mai Động", 20.9945, 105.8640),
            ),
        ),
        Ward(
            "Giảng Võ",
            21.0265,
            105.8195,
            (
                _road("Kim Mã", 21.0315, 105.8220),
                _market("Chợ Thành Công", 21.0205, 105.8165),
                _substation("TBA 110kV Thành Công", 21.0225, 105.8130),
            ),
        ),
        Ward(
            "Ngọc Hà",
            21.0390,
            105.8235,
            (
                _road("Liễu Giai", 21.0370, 105.8155),
                _low("Liễu Giai – Đội Cấn", 21.0360, 105.8170),
                _market("Chợ Ngọc Hà", 21.0395, 105.8300),
            ),
        ),
        Ward(
            "Đống Đa",
            21.0130,
            105.8250,
            (
                _road("Tây Sơn", 21.0080, 105.8235),
                _road("Nguyễn Lương Bằng", 21.0160, 105.8285),
            ),
        ),
        Ward(
            "Láng",
            21.0185,
            105.8070,
            (_river("Sông Tô Lịch – đường Láng", 21.0165, 105.8095, tide=0.0),),
        ),
        Ward(
            "Yên Hòa",
            21.0165,
            105.7975,
            (
                _road("Trần Duy Hưng", 21.0120, 105.8005),
                _low("Trần Duy Hưng – Trung Hòa", 21.0085, 105.8010),
            ),
        ),
        Ward(
            "Nghĩa Đô",
            21.0440,
            105.7960,
            (
                _road("Phạm Văn Đồng", 21.0440, 105.7815),
                _market("Chợ Nghĩa Tân", 21.0460, 105.7935),
                _substation("TBA 110kV Nghĩa Đô", 21.0455, 105.7990),
            ),
        ),
        Ward(
            "Tây Hồ",
            21.0660,
            105.8190,
            (
                _road("Lạc Long Quân", 21.0600, 105.8090),
                _road("Âu Cơ", 21.0720, 105.8300),
                _river("Sông Hồng – cầu Nhật Tân", 21.0830, 105.8230, tide=0.12),
                _market("Chợ Quảng Bá", 21.0660, 105.8275),
            ),
        ),
        Ward(
            "Long Biên",
            21.0285,
            105.8950,
            (_road("Nguyễn Văn Linh", 21.0345, 105.8880),),
        ),
        Ward(
            "Việt Hưng",
            21.0620,
            105.8980,
            (
                _road("Ngô Gia Tự", 21.0575, 105.8885),
                _river("Sông Đuống – Đức Giang", 21.0745, 105.8985, tide=0.1),
            ),
        ),
        Ward(
            "Định Công",
            20.9815,
            105.8270,
            (_river("Sông Tô Lịch – Định Công", 20.9790, 105.8305, tide=0.0),),
        ),
        Ward(
            "Hoàng Liệt",
            20.9640,
            105.8420,
            (
                _road("Vành đai 3 – Pháp Vân", 20.9555, 105.8440),
                _works("Nhà máy nước Pháp Vân", 20.9560, 105.8470),
            ),
        ),
        Ward(
            "Yên Sở",
            20.9670,
            105.8700,
            (_substation("TBA 110kV Yên Sở", 20.9635, 105.8745),),
        ),
    ),
    # A port city on the Cấm and Lạch Tray rivers a few kilometres from the sea: the tide floods
    # Tam Bạc street and the riverside wards at every spring high water. Since 2025 it takes in the
    # former Hải Dương province, on the Thái Bình river further inland.
    "hai-phong": (
        Ward(
            "Hồng Bàng",
            20.8631,
            106.6720,
            (
                _road("Hoàng Văn Thụ", 20.8605, 106.6840),
                _road("Trần Hưng Đạo", 20.8575, 106.6870),
                _road("Hùng Vương", 20.8630, 106.6450),
                _road("Bạch Đằng", 20.8665, 106.6755),
                _river("Sông Tam Bạc – cầu Lạc Long", 20.8620, 106.6800, tide=0.8),
                _river("Sông Cấm – Thượng Lý", 20.8715, 106.6640, tide=0.9),
                _low("Tam Bạc", 20.8605, 106.6780, tide=0.5),
                _market("Chợ Sắt", 20.8620, 106.6790),
                _market("Chợ Tam Bạc", 20.8595, 106.6755),
                _substation("TBA 110kV Cửa Cấm", 20.8680, 106.6620),
                _works("Nhà máy nước An Dương", 20.8640, 106.6400),
            ),
        ),
        Ward(
            "Lê Chân",
            20.8430,
            106.6790,
            (
                _road("Nguyễn Văn Linh", 20.8405, 106.6740),
                _road("Hồ Sen – Cầu Rào 2", 20.8380, 106.6850),
                _river("Sông Lạch Tray – cầu Rào", 20.8275, 106.6860, tide=0.7),
                _low("Hàng Kênh", 20.8470, 106.6840),
                _market("Chợ Hàng", 20.8400, 106.6795),
                _substation("TBA 110kV Lê Chân", 20.8450, 106.6720),
                _works("Trạm bơm tăng áp Lê Chân", 20.8430, 106.6760),
            ),
        ),
        Ward(
            "Ngô Quyền",
            20.8600,
            106.6985,
            (
                _road("Đà Nẵng", 20.8625, 106.7010),
                _road("Lê Hồng Phong", 20.8465, 106.7100),
                _river("Sông Cấm – cảng Hoàng Diệu", 20.8665, 106.6895, tide=0.9),
                _market("Chợ Lũng", 20.8495, 106.7060),
            ),
        ),
        Ward(
            "Hải An",
            20.8290,
            106.7220,
            (
                _road("Lê Hồng Phong – Cát Bi", 20.8300, 106.7200),
                _road("Ngô Gia Tự", 20.8265, 106.7155),
                _river("Sông Lạch Tray – Đằng Hải", 20.8250, 106.7300, tide=0.75),
                _low("Ngô Gia Tự – Cát Bi", 20.8235, 106.7185),
                _market("Chợ Cát Bi", 20.8280, 106.7185),
                _substation("TBA 110kV Cát Bi", 20.8330, 106.7150),
            ),
        ),
        Ward(
            "Kiến An",
            20.8090,
            106.6290,
            (
                _road("Trần Thành Ngọ", 20.8110, 106.6330),
                _road("Trường Chinh", 20.8200, 106.6380),
                _road("Phan Đăng Lưu", 20.8050, 106.6270),
                _river("Sông Lạch Tray – cầu Niệm", 20.8290, 106.6560, tide=0.6),
                _low("Trần Tất Văn", 20.8080, 106.6310),
                _market("Chợ Kiến An", 20.8085, 106.6265),
                _substation("TBA 110kV Kiến An", 20.8150, 106.6200),
                _works("Nhà máy nước Kiến An", 20.8120, 106.6250),
            ),
        ),
        Ward(
            "Gia Viên",
            20.8460,
            106.6965,
            (
                _road("Lạch Tray", 20.8510, 106.6960),
                _road("Văn Cao", 20.8450, 106.7000),
                _river("Sông Lạch Tray – Đằng Giang", 20.8380, 106.7050, tide=0.7),
                _low("Lạch Tray – Văn Cao", 20.8470, 106.6990),
                _substation("TBA 110kV Lạch Tray", 20.8480, 106.6950),
                _works("Trạm bơm tăng áp Văn Cao", 20.8445, 106.7010),
            ),
        ),
        Ward(
            "Hải Dương",
            20.9405,
            106.3310,
            (
                _road("Thanh Niên", 20.9380, 106.3360),
                _road("Trần Hưng Đạo – Hải Dương", 20.9400, 106.3285),
                _river("Sông Sặt", 20.9340, 106.3250, tide=0.1),
                _works("Nhà máy nước Cẩm Thượng", 20.9560, 106.3230),
            ),
        ),
        Ward(
            "An Biên",
            20.8545,
            106.6745,
            (
                _road("Tô Hiệu", 20.8520, 106.6780),
                _river("Sông Tam Bạc – Trần Nguyên Hãn", 20.8525, 106.6700, tide=0.75),
                _low("Trần Nguyên Hãn", 20.8510, 106.6690, tide=0.45),
            ),
        ),
        Ward(
            "Đông Hải",
            20.8480,
            106.7520,
            (
                _road("Đình Vũ", 20.8400, 106.7700),
                _river("Sông Cấm – Đông Hải", 20.8560, 106.7450, tide=0.95),
                _works("Trạm cấp nước Đông Hải", 20.8500, 106.7420),
            ),
        ),
        Ward(
            "Thủy Nguyên",
            20.9250,
            106.6690,
            (
                _road("Quốc lộ 10 – Núi Đèo", 20.9270, 106.6740),
                _river("Sông Cấm – bến Bính", 20.8820, 106.6930, tide=0.9),
                _market("Chợ Núi Đèo", 20.9235, 106.6715),
            ),
        ),
        Ward(
            "Đồ Sơn",
            20.7160,
            106.7850,
            (
                _road("Lý Thánh Tông", 20.7240, 106.7780),
                _river("Cảng cá Ngọc Hải", 20.7290, 106.7930, tide=1.0),
                _market("Chợ Đồ Sơn", 20.7200, 106.7880),
            ),
        ),
        Ward(
            "Thành Đông",
            20.9440,
            106.3560,
            (
                _road("Quốc lộ 5 – Thành Đông", 20.9450, 106.3500),
                _river("Sông Thái Bình – cầu Phú Lương", 20.9490, 106.3620, tide=0.3),
            ),
        ),
        Ward(
            "Việt Hòa",
            20.9480,
            106.2950,
            (
                _road("Quốc lộ 5 – Việt Hòa", 20.9455, 106.2900),
                _substation("TBA 110kV Đồng Niên", 20.9500, 106.3060),
                _works("Nhà máy nước Việt Hòa", 20.9520, 106.2965),
            ),
        ),
        Ward(
            "Lê Thanh Nghị",
            20.9300,
            106.3175,
            (_road("Lê Thanh Nghị", 20.9285, 106.3145),),
        ),
        Ward(
            "Phù Liễn",
            20.7930,
            106.6380,
            (_river("Sông Đa Độ", 20.7950, 106.6300, tide=0.5),),
        ),
    ),
    # Coal towns and Hạ Long Bay: the full diurnal tide of the Gulf of Tonkin at Cửa Lục and up the
    # Bạch Đằng, the Ka Long on the border at Móng Cái.
    "quang-ninh": (
        Ward(
            "Hồng Gai",
            20.9530,
            107.0760,
            (
                _road("Trần Hưng Đạo", 20.9545, 107.0845),
                _river("Cửa Lục – cầu Bãi Cháy", 20.9560, 107.0690, tide=1.0),
                _low("Cao Thắng", 20.9600, 107.0870),
                _low("Lê Thánh Tông", 20.9505, 107.0790, tide=0.5),
                _market("Chợ Hạ Long I", 20.9500, 107.0815),
            ),
        ),
        Ward(
            "Cẩm Phả",
            21.0130,
            107.2880,
            (
                _road("Quốc lộ 18 – Cẩm Trung", 21.0120, 107.2850),
                _road("Trần Phú", 21.0080, 107.2750),
                _low("Cẩm Trung", 21.0090, 107.2900),
                _market("Chợ Cẩm Đông", 21.0100, 107.3000),
                _substation("TBA 220kV Cẩm Phả", 21.0300, 107.2700),
            ),
        ),
        Ward(
            "Uông Bí",
            21.0333,
            106.7833,
            (
                _road("Quốc lộ 18 – Quang Trung", 21.0360, 106.7750),
                _road("Trần Nhân Tông", 21.0300, 106.7850),
                _river("Sông Uông", 21.0300, 106.7900, tide=0.4),
                _low("Quang Trung", 21.0330, 106.7800),
                _market("Chợ Uông Bí", 21.0345, 106.7745),
                _substation("Nhà máy nhiệt điện Uông Bí", 21.0300, 106.7600),
                _works("Nhà máy nước Lán Tháp", 21.0480, 106.7800),
            ),
        ),
        Ward(
            "Quảng Yên",
            20.9380,
            106.8030,
            (
                _road("Quốc lộ 10 – Quảng Yên", 20.9400, 106.8000),
                _river("Sông Bạch Đằng – Quảng Yên", 20.9150, 106.7950, tide=0.95),
                _market("Chợ Rừng", 20.9350, 106.8050),
                _substation("TBA 110kV Quảng Yên", 20.9450, 106.8100),
                _works("Trạm cấp nước Quảng Yên", 20.9420, 106.8080),
            ),
        ),
        Ward(
            "Móng Cái 1",
            21.5290,
            107.9630,
            (
                _road("Hùng Vương", 21.5300, 107.9650),
                _river("Sông Ka Long – cầu Bắc Luân", 21.5440, 107.9680, tide=0.55),
                _river("Sông Ka Long – Ka Long", 21.5350, 107.9600, tide=0.5),
                _low("Trần Phú – Móng Cái", 21.5270, 107.9680),
                _market("Chợ Trung tâm Móng Cái", 21.5300, 107.9660),
            ),
        ),
        Ward(
            "Bãi Cháy",
            20.9570,
            107.0450,
            (
                _road("Hạ Long – Bãi Cháy", 20.9525, 107.0500),
                _substation("TBA 110kV Giếng Đáy", 20.9650, 107.0250),
            ),
        ),
        Ward(
            "Hạ Long",
            20.9550,
            107.1050,
            (_road("Nguyễn Văn Cừ", 20.9575, 107.1000),),
        ),
        Ward(
            "Hà Tu",
            20.9700,
            107.1420,
            (
                _road("Quốc lộ 18 – Hà Tu", 20.9670, 107.1300),
                _river("Sông Diễn Vọng", 21.0150, 107.1400, tide=0.8),
                _works("Nhà máy nước Diễn Vọng", 21.0100, 107.1600),
            ),
        ),
        Ward(
            "Cửa Ông",
            21.0300,
            107.3560,
            (_river("Cảng Cửa Ông", 21.0250, 107.3500, tide=1.0),),
        ),
        Ward(
            "Mông Dương",
            21.0690,
            107.3280,
            (_river("Sông Mông Dương", 21.0650, 107.3350, tide=0.6),),
        ),
        Ward(
            "Quang Hanh",
            21.0060,
            107.2350,
            (_works("Nhà máy nước Cẩm Phả", 21.0200, 107.2600),),
        ),
        Ward(
            "Phong Cốc",
            20.9090,
            106.8260,
            (
                _river("Sông Chanh", 20.9300, 106.8250, tide=0.85),
                _low("Phong Cốc", 20.9150, 106.8200, tide=0.6),
            ),
        ),
        Ward(
            "Móng Cái 2",
            21.5110,
            107.9700,
            (
                _road("Quốc lộ 18 – Hải Hòa", 21.5100, 107.9800),
                _substation("TBA 110kV Móng Cái", 21.5150, 107.9500),
                _works("Nhà máy nước Móng Cái", 21.5200, 107.9550),
            ),
        ),
    ),
    # The Hàn river between the centre and Sơn Trà; a mixed, mostly semi-diurnal tide of about a metre.
    # Since 2025 the city takes in the former Quảng Nam province: Hội An on the Thu Bồn's mouth,
    # flooded most autumns, and Tam Kỳ.
    "da-nang": (
        Ward(
            "Hải Châu",
            16.0650,
            108.2190,
            (
                _road("Bạch Đằng", 16.0700, 108.2245),
                _road("Nguyễn Văn Linh", 16.0600, 108.2100),
                _road("Lê Duẩn", 16.0705, 108.2165),
                _river("Sông Hàn – cầu Rồng", 16.0612, 108.2275, tide=0.4),
                _river("Sông Hàn – cầu Sông Hàn", 16.0720, 108.2265, tide=0.4),
                _low("Ông Ích Khiêm", 16.0660, 108.2130),
                _market("Chợ Hàn", 16.0680, 108.2240),
                _market("Chợ Cồn", 16.0680, 108.2140),
                _substation("TBA 110kV Hải Châu", 16.0550, 108.2150),
                _works("Trạm bơm tăng áp Hải Châu", 16.0500, 108.2100),
            ),
        ),
        Ward(
            "Thanh Khê",
            16.0685,
            108.1895,
            (
                _road("Điện Biên Phủ", 16.0650, 108.1900),
                _road("Trần Cao Vân", 16.0720, 108.1950),
                _river("Kênh Phú Lộc", 16.0720, 108.1750, tide=0.3),
                _low("Điện Biên Phủ – Hà Huy Tập", 16.0655, 108.1840),
                _market("Chợ Tam Giác", 16.0690, 108.1970),
            ),
        ),
        Ward(
            "An Hải",
            16.0660,
            108.2370,
            (
                _road("Ngô Quyền", 16.0700, 108.2350),
                _road("Phạm Văn Đồng", 16.0715, 108.2410),
                _road("Võ Nguyên Giáp", 16.0650, 108.2460),
                _river("Sông Hàn – An Hải", 16.0650, 108.2300, tide=0.4),
                _low("Ngô Quyền – An Hải", 16.0620, 108.2350),
                _market("Chợ An Hải Đông", 16.0580, 108.2380),
                _works("Trạm bơm tăng áp An Hải", 16.0640, 108.2390),
            ),
        ),
        Ward(
            "Hòa Khánh",
            16.0740,
            108.1530,
            (
                _road("Tôn Đức Thắng", 16.0650, 108.1650),
                _road("Nguyễn Lương Bằng", 16.0760, 108.1500),
                _low("Âu Cơ", 16.0700, 108.1450),
                _market("Chợ Hòa Khánh", 16.0720, 108.1500),
                _substation("TBA 110kV Hòa Khánh", 16.0750, 108.1420),
                _works("Trạm cấp nước Hòa Khánh", 16.0700, 108.1400),
            ),
        ),
        Ward(
            "Sơn Trà",
            16.0950,
            108.2430,
            (
                _river("Âu thuyền Thọ Quang", 16.0980, 108.2500, tide=0.5),
                _substation("TBA 110kV An Đồn", 16.0800, 108.2300),
            ),
        ),
        Ward(
            "Hội An",
            15.8790,
            108.3270,
            (
                _road("Trần Hưng Đạo", 15.8805, 108.3240),
                _river("Sông Hoài – phố cổ Hội An", 15.8765, 108.3290, tide=0.6),
                _low("Bạch Đằng – Hội An", 15.8772, 108.3262, tide=0.5),
                _market("Chợ Hội An", 15.8775, 108.3305),
            ),
        ),
        Ward(
            "An Khê",
            16.0610,
            108.1830,
            (
                _road("Hà Huy Tập", 16.0640, 108.1830),
                _substation("TBA 110kV Thanh Khê", 16.0600, 108.1850),
                _works("Nhà máy nước Sân Bay", 16.0590, 108.1970),
            ),
        ),
        Ward(
            "Hòa Cường",
            16.0380,
            108.2180,
            (_road("2 Tháng 9", 16.0400, 108.2230),),
        ),
        Ward(
            "Cẩm Lệ",
            16.0150,
            108.1980,
            (
                _road("Cách Mạng Tháng 8", 16.0230, 108.2080),
                _river("Sông Cẩm Lệ – cầu Cẩm Lệ", 16.0120, 108.2030, tide=0.3),
                _works("Nhà máy nước Cầu Đỏ", 16.0020, 108.1770),
            ),
        ),
        Ward(
            "Ngũ Hành Sơn",
            16.0050,
            108.2550,
            (
                _road("Lê Văn Hiến", 16.0150, 108.2480),
                _market("Chợ Bắc Mỹ An", 16.0470, 108.2430),
            ),
        ),
        Ward(
            "Liên Chiểu",
            16.0960,
            108.1400,
            (
                _road("Nguyễn Tất Thành", 16.0800, 108.1600),
                _river("Sông Cu Đê – Nam Ô", 16.1190, 108.1280, tide=0.45),
            ),
        ),
        Ward(
            "Hội An Đông",
            15.8900,
            108.3620,
            (_river("Cửa Đại", 15.8830, 108.3800, tide=1.0),),
        ),
        Ward(
            "Tam Kỳ",
            15.5735,
            108.4760,
            (
                _road("Phan Chu Trinh", 15.5720, 108.4735),
                _river("Sông Bàn Thạch", 15.5780, 108.4900, tide=0.35),
                _market("Chợ Tam Kỳ", 15.5750, 108.4780),
            ),
        ),
    ),
}

# Catchments as the wards they gather: every ward of a city in exactly one, so that every station
# lies in one.
CATCHMENTS: dict[str, tuple[Catchment, ...]] = {
    "ha-noi": (
        Catchment(
            "to-lich",
            "Lưu vực sông Tô Lịch",
            "To Lich river catchment",
            (
                "Ba Đình",
                "Ngọc Hà",
                "Giảng Võ",
                "Đống Đa",
                "Láng",
                "Cầu Giấy",
                "Nghĩa Đô",
                "Yên Hòa",
                "Tây Hồ",
                "Thanh Xuân",
                "Khương Đình",
                "Định Công",
            ),
        ),
        Catchment(
            "kim-nguu",
            "Lưu vực sông Kim Ngưu – Lừ – Sét",
            "Kim Nguu, Lu and Set rivers catchment",
            (
                "Hoàn Kiếm",
                "Cửa Nam",
                "Văn Miếu – Quốc Tử Giám",
                "Kim Liên",
                "Hai Bà Trưng",
                "Bạch Mai",
                "Tương Mai",
                "Hoàng Mai",
                "Hoàng Liệt",
                "Yên Sở",
            ),
        ),
        Catchment("song-hong", "Ven sông Hồng", "Red River banks", ("Hồng Hà", "Vĩnh Tuy")),
        Catchment(
            "cau-bay",
            "Lưu vực sông Cầu Bây",
            "Cau Bay river catchment",
            ("Bồ Đề", "Việt Hưng", "Long Biên"),
        ),
    ),
    "hai-phong": (
        Catchment("tam-bac", "Lưu vực sông Tam Bạc", "Tam Bac river catchment", ("Hồng Bàng", "An Biên")),
        Catchment(
            "lach-tray",
            "Lưu vực sông Lạch Tray",
            "Lach Tray river catchment",
            ("Lê Chân", "Gia Viên", "Hải An", "Kiến An"),
        ),
        Catchment("cam", "Ven sông Cấm", "Cam river banks", ("Ngô Quyền", "Đông Hải", "Thủy Nguyên")),
        Catchment("da-do", "Lưu vực sông Đa Độ", "Da Do river catchment", ("Phù Liễn", "Đồ Sơn")),
        Catchment(
            "thai-binh",
            "Lưu vực sông Thái Bình – sông Sặt",
            "Thai Binh and Sat rivers catchment",
            ("Hải Dương", "Thành Đông", "Việt Hòa", "Lê Thanh Nghị"),
        ),
    ),
    "quang-ninh": (
        Catchment(
            "cua-luc",
            "Lưu vực vịnh Cửa Lục",
            "Cua Luc bay catchment",
            ("Bãi Cháy", "Hồng Gai", "Hạ Long", "Hà Tu"),
        ),
        Catchment(
            "bach-dang",
            "Lưu vực sông Bạch Đằng – sông Chanh",
            "Bach Dang and Chanh rivers catchment",
            ("Uông Bí", "Quảng Yên", "Phong Cốc"),
        ),
        Catchment(
            "mong-duong",
            "Lưu vực sông Mông Dương – Cửa Ông",
            "Mong Duong river and Cua Ong catchment",
            ("Quang Hanh", "Cẩm Phả", "Cửa Ông", "Mông Dương"),
        ),
        Catchment("ka-long", "Lưu vực sông Ka Long", "Ka Long river catchment", ("Móng Cái 1", "Móng Cái 2")),
    ),
    "da-nang": (
        Catchment(
            "han",
            "Lưu vực sông Hàn",
            "Han river catchment",
            ("Hải Châu", "Hòa Cường", "An Hải", "Sơn Trà"),
        ),
        Catchment("phu-loc", "Lưu vực kênh Phú Lộc", "Phu Loc canal catchment", ("Thanh Khê", "An Khê")),
        Catchment("cu-de", "Lưu vực sông Cu Đê", "Cu De river catchment", ("Hòa Khánh", "Liên Chiểu")),
        Catchment(
            "cam-le",
            "Lưu vực sông Cẩm Lệ – Cổ Cò",
            "Cam Le and Co Co rivers catchment",
            ("Cẩm Lệ", "Ngũ Hành Sơn"),
        ),
        Catchment(
            "thu-bon",
            "Hạ lưu sông Thu Bồn",
            "Lower Thu Bon river",
            ("Hội An", "Hội An Đông"),
        ),
        Catchment("ban-thach", "Lưu vực sông Bàn Thạch", "Ban Thach river catchment", ("Tam Kỳ",)),
    ),
}


def places_of(city: str) -> tuple[Ward, ...]:
    """The wards of a city's map, or ValueError naming the maps there are."""
    wards = CITIES.get(city)
    if wards is None:
        raise ValueError(f"no map of city {city!r}; known: {', '.join(CITIES)}")
    return wards


# -- generated areas ---------------------------------------------------------------------------

# Coordinates of generated polygons are rounded to this (about 0.1 m).
_GRID_DEG = 1e-6
# How far a generated city reaches past its outermost places (about 4 km).
_REACH_DEG = 0.04
# Said in every generated area's properties, so that nobody mistakes it for a boundary.
_APPROXIMATE = {"approximate": True}
_WARD_SOURCE = "generated from the simulator's ward centres and places (Voronoi cells); not official"
_PROVINCE_SOURCE = "generated: the union of the simulator's generated wards; not official"
_CATCHMENT_SOURCE = (
    "generated: the union of the simulator's generated wards along the river; not hydrological"
)


def slug(name: str) -> str:
    """`Văn Miếu – Quốc Tử Giám` → `van-mieu-quoc-tu-giam`: for area ids."""
    return re.sub(r"[^a-z0-9]+", "-", ascii_name(name).lower()).strip("-")


def ascii_name(name: str) -> str:
    """A Vietnamese name without its tones and marks (`Hải Châu` → `Hai Chau`), as English writes it."""
    plain = name.replace("đ", "d").replace("Đ", "D")
    decomposed = unicodedata.normalize("NFD", plain)
    return "".join(char for char in decomposed if not unicodedata.combining(char))


@functools.cache
def _cells() -> dict[tuple[str, str], BaseGeometry]:
    """Each ward's share of the plane, by (city, ward): the Voronoi cells of its centre and its
    places, merged. All cities are tessellated together, so neighbouring cities (Hải Phòng and
    Quảng Ninh share the Bạch Đằng) never overlap, and every place lies inside its own ward."""
    import shapely

    # Each point once, with the ward it belongs to.
    owner_of: dict[tuple[float, float], tuple[str, str]] = {}
    for city, wards in CITIES.items():
        for ward in wards:
            for lat, lon in [(ward.lat, ward.lon), *((site.lat, site.lon) for site in ward.sites)]:
                owner = owner_of.setdefault((lon, lat), (city, ward.name))
                if owner != (city, ward.name):
                    raise ValueError(f"{ward.name} ({city}) and {owner[1]} ({owner[0]}) share {lat}, {lon}")
    points, owners = list(owner_of), list(owner_of.values())
    west = min(b.west for b in CITY_BOUNDS.values()) - 1
    south = min(b.south for b in CITY_BOUNDS.values()) - 1
    east = max(b.east for b in CITY_BOUNDS.values()) + 1
    north = max(b.north for b in CITY_BOUNDS.values()) + 1
    diagram = shapely.voronoi_polygons(
        shapely.multipoints(points), extend_to=shapely.box(west, south, east, north), ordered=True
    )
    parts: dict[tuple[str, str], list[BaseGeometry]] = {}
    for owner, cell in zip(owners, shapely.get_parts(diagram), strict=True):
        parts.setdefault(owner, []).append(cell)
    return {owner: shapely.union_all(cells) for owner, cells in parts.items()}


@functools.cache
def ward_shapes(places: str) -> dict[str, Polygon | MultiPolygon]:
    """The generated polygon of each ward of `places`' map, by ward name: its cells cut to the
    city's extent, coordinates rounded. The wards tile the city without overlapping."""
    import shapely
    from shapely.geometry import MultiPolygon, Polygon

    wards = places_of(places)
    cells = _cells()
    extent = _extent(places, wards)
    shapes: dict[str, Polygon | MultiPolygon] = {}
    for ward in wards:
        shape = shapely.set_precision(shapely.intersection(cells[(places, ward.name)], extent), _GRID_DEG)
        if not isinstance(shape, Polygon | MultiPolygon) or shape.is_empty:
            raise ValueError(f"the generated ward {ward.name} of {places} is a {shape.geom_type}")
        shapes[ward.name] = shape
    return shapes


def _extent(places: str, wards: tuple[Ward, ...]) -> BaseGeometry:
    """What the generated city covers: the hull of its places with a few kilometres around, within
    its bounds (a coastal province comes out as the strip it is, not a box of sea and mountains)."""
    import shapely

    bounds = CITY_BOUNDS[places]
    points = [(ward.lon, ward.lat) for ward in wards] + [(s.lon, s.lat) for ward in wards for s in ward.sites]
    hull = shapely.convex_hull(shapely.multipoints(points)).buffer(_REACH_DEG, quad_segs=4)
    return shapely.intersection(hull, shapely.box(bounds.west, bounds.south, bounds.east, bounds.north))


def zone_of_ward(city: str, ward: str, *, places: str | None = None) -> str:
    """The id of the area (stored under `city`) a flood station in `ward` is correlated in: the
    catchment gathering the ward, else the ward itself (as `city_areas` names them). The map's
    catchments do not overlap, so the store's tie-break among several never comes into play."""
    for catchment in CATCHMENTS.get(places or city, ()):
        if ward in catchment.wards:
            return f"{city}.catchment.{catchment.key}"
    return f"{city}.ward.{slug(ward)}"


def city_areas(city: str, *, places: str | None = None) -> list[dict[str, Any]]:
    """The approximate areas of `places`' map (by default `city`'s own) stored under `city`, as
    GeoJSON Features (see `ioc_core.areas.parse_feature`): its province first, then one ward per
    ward of the map (the province its parent), then its catchments. Ids are stable:
    `hai-phong.province`, `hai-phong.ward.le-chan`, `hai-phong.catchment.tam-bac`."""
    import shapely

    places = places or city
    wards = ward_shapes(places)
    province = PROVINCES[places]
    province_id = f"{city}.province"
    province_shape = shapely.union_all(list(wards.values()))
    features = [
        _feature(
            province_id,
            province_shape,
            {
                "name_vi": province.name_vi,
                "name_en": province.name_en,
                "kind": "province",
                "code": province.code,
                "city": city,
                "source": _PROVINCE_SOURCE,
            },
        )
    ]
    for ward in places_of(places):
        features.append(
            _feature(
                f"{city}.ward.{slug(ward.name)}",
                wards[ward.name],
                {
                    "name_vi": ward.title,
                    "name_en": f"{ascii_name(ward.name)} {_UNITS_EN[ward.unit]}",
                    "kind": "ward",
                    "parent": province_id,
                    "city": city,
                    "source": _WARD_SOURCE,
                },
            )
        )
    for catchment in CATCHMENTS.get(places, ()):
        features.append(
            _feature(
                f"{city}.catchment.{catchment.key}",
                shapely.union_all([wards[name] for name in catchment.wards]),
                {
                    "name_vi": catchment.name_vi,
                    "name_en": catchment.name_en,
                    "kind": "catchment",
                    "parent": province_id,
                    "city": city,
                    "source": _CATCHMENT_SOURCE,
                },
            )
        )
    return features


def _feature(area_id: str, shape: BaseGeometry, properties: dict[str, Any]) -> dict[str, Any]:
    import shapely
    from shapely.geometry import mapping

    geometry = dict(mapping(shapely.set_precision(shape, _GRID_DEG)))
    return {
        "type": "Feature",
        "id": area_id,
        "geometry": _lists(geometry),
        "properties": {**properties, **_APPROXIMATE},
    }


def _lists(value: Any) -> Any:
    """`mapping` writes positions as tuples; GeoJSON (and `parse_feature`) wants lists."""
    if isinstance(value, tuple | list):
        return [_lists(item) for item in value]
    if isinstance(value, dict):
        return {key: _lists(item) for key, item in value.items()}
    return value
