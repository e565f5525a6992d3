"""Where simulated devices stand: city districts with their real arterial roads, rivers and canals,
flood-prone streets, markets, substations and water works (WGS 84, to within a few hundred metres).

A domain names the kinds of place its devices stand at (`Domain.sites`); the fleet puts each
device at one such place of its district, or around the district's centre where there is none.
"""

from __future__ import annotations

from dataclasses import dataclass

ROAD = "road"
RIVER = "river"
LOW_STREET = "low_street"
MARKET = "market"
SUBSTATION = "substation"
WATER_WORKS = "water_works"
SITE_KINDS = (ROAD, RIVER, LOW_STREET, MARKET, SUBSTATION, WATER_WORKS)


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
class District:
    name: str
    lat: float
    lon: float
    sites: tuple[Site, ...] = ()

    def sites_of(self, kind: str) -> tuple[Site, ...]:
        return tuple(site for site in self.sites if site.kind == kind)


@dataclass(frozen=True)
class Bounds:
    south: float
    west: float
    north: float
    east: float

    def contains(self, lat: float, lon: float) -> bool:
        return self.south <= lat <= self.north and self.west <= lon <= self.east


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


# The urban core of each city (the area its fleets cover), for maps and sanity checks.
CITY_BOUNDS: dict[str, Bounds] = {
    "ha-noi": Bounds(20.93, 105.74, 21.10, 105.95),
    "hai-phong": Bounds(20.76, 106.58, 20.90, 106.82),
    "quang-ninh": Bounds(20.88, 106.70, 21.58, 108.02),
    "da-nang": Bounds(15.95, 108.10, 16.15, 108.30),
}

CITIES: dict[str, tuple[District, ...]] = {
    # The Red River barely feels the tide at Hà Nội; the canals (Tô Lịch, Kim Ngưu, Lừ, Sét) drain
    # the city to the Yên Sở pumping station.
    "ha-noi": (
        District(
            "Hoàn Kiếm",
            21.0287,
            105.8524,
            (
                _road("Trần Hưng Đạo", 21.0205, 105.8500),
                _road("Tràng Tiền – Hàng Bài", 21.0245, 105.8535),
                _road("Trần Quang Khải", 21.0300, 105.8575),
                _river("Sông Hồng – bến Phúc Tân", 21.0345, 105.8592, tide=0.12),
                _low("Phan Bội Châu", 21.0240, 105.8445),
                _market("Chợ Đồng Xuân", 21.0380, 105.8495),
                _substation("TBA 110kV Trần Hưng Đạo", 21.0195, 105.8560),
                _works("Nhà máy nước Đồn Thủy", 21.0215, 105.8600),
            ),
        ),
        District(
            "Ba Đình",
            21.0340,
            105.8140,
            (
                _road("Kim Mã", 21.0315, 105.8220),
                _road("Liễu Giai", 21.0370, 105.8155),
                _road("Nguyễn Thái Học", 21.0295, 105.8405),
                _river("Sông Hồng – Phúc Xá", 21.0490, 105.8485, tide=0.12),
                _low("Liễu Giai – Đội Cấn", 21.0360, 105.8170),
                _market("Chợ Ngọc Hà", 21.0395, 105.8300),
                _market("Chợ Thành Công", 21.0205, 105.8165),
                _substation("TBA 110kV Thành Công", 21.0225, 105.8130),
                _works("Nhà máy nước Yên Phụ", 21.0455, 105.8445),
            ),
        ),
        District(
            "Đống Đa",
            21.0128,
            105.8270,
            (
                _road("Tây Sơn", 21.0080, 105.8235),
                _road("Xã Đàn", 21.0140, 105.8360),
                _road("Nguyễn Lương Bằng", 21.0160, 105.8285),
                _road("Giải Phóng – Kim Liên", 21.0065, 105.8415),
                _river("Sông Tô Lịch – đường Láng", 21.0165, 105.8095, tide=0.0),
                _river("Sông Lừ – Trung Tự", 21.0070, 105.8330, tide=0.0),
                _low("Nguyễn Khuyến", 21.0280, 105.8375),
                _market("Chợ Kim Liên", 21.0085, 105.8385),
                _substation("TBA 110kV Giám", 21.0245, 105.8330),
                _works("Nhà máy nước Ngô Sỹ Liên", 21.0265, 105.8395),
            ),
        ),
        District(
            "Hai Bà Trưng",
            21.0058,
            105.8573,
            (
                _road("Minh Khai", 20.9975, 105.8620),
                _road("Bạch Mai", 21.0040, 105.8505),
                _road("Đại Cồ Việt", 21.0075, 105.8470),
                _road("Lò Đúc", 21.0145, 105.8590),
                _river("Sông Kim Ngưu – Lò Đúc", 21.0100, 105.8625, tide=0.0),
                _river("Sông Hồng – Vĩnh Tuy", 21.0055, 105.8760, tide=0.12),
                _low("Bạch Mai – Minh Khai", 20.9980, 105.8510),
                _market("Chợ Hôm", 21.0155, 105.8515),
                _market("Chợ Mơ", 20.9965, 105.8525),
                _substation("TBA 110kV Mai Động", 20.9945, 105.8640),
                _works("Nhà máy nước Lương Yên", 21.0145, 105.8625),
            ),
        ),
        District(
            "Cầu Giấy",
            21.0362,
            105.7906,
            (
                _road("Xuân Thủy", 21.0365, 105.7870),
                _road("Cầu Giấy", 21.0330, 105.7985),
                _road("Trần Duy Hưng", 21.0120, 105.8005),
                _road("Phạm Văn Đồng", 21.0440, 105.7815),
                _river("Sông Tô Lịch – cầu Giấy", 21.0325, 105.8020, tide=0.0),
                _low("Trần Duy Hưng – Trung Hòa", 21.0085, 105.8010),
                _market("Chợ Nghĩa Tân", 21.0460, 105.7935),
                _substation("TBA 110kV Nghĩa Đô", 21.0455, 105.7990),
                _works("Nhà máy nước Mai Dịch", 21.0385, 105.7760),
            ),
        ),
        District(
            "Thanh Xuân",
            20.9936,
            105.8113,
            (
                _road("Nguyễn Trãi", 20.9960, 105.8085),
                _road("Khuất Duy Tiến", 20.9975, 105.7995),
                _road("Lê Văn Lương", 21.0045, 105.8060),
                _road("Nguyễn Xiển", 20.9820, 105.8070),
                _river("Sông Tô Lịch – Khương Đình", 20.9930, 105.8175, tide=0.0),
                _low("Nguyễn Xiển – Kim Giang", 20.9840, 105.8100),
                _market("Chợ Thượng Đình", 20.9990, 105.8150),
                _substation("TBA 110kV Thượng Đình", 20.9975, 105.8140),
                _works("Nhà máy nước Hạ Đình", 20.9870, 105.8130),
            ),
        ),
        District(
            "Hoàng Mai",
            20.9742,
            105.8636,
            (
                _road("Giải Phóng – Giáp Bát", 20.9805, 105.8415),
                _road("Tam Trinh", 20.9830, 105.8665),
                _road("Vành đai 3 – Pháp Vân", 20.9555, 105.8440),
                _road("Lĩnh Nam", 20.9860, 105.8750),
                _river("Sông Kim Ngưu – Tam Trinh", 20.9850, 105.8645, tide=0.0),
                _river("Sông Tô Lịch – Định Công", 20.9790, 105.8305, tide=0.0),
                _river("Sông Sét – Giáp Bát", 20.9860, 105.8460, tide=0.0),
                _low("Giải Phóng – Kim Đồng", 20.9850, 105.8415),
                _market("Chợ Đền Lừ", 20.9875, 105.8580),
                _substation("TBA 110kV Yên Sở", 20.9635, 105.8745),
                _works("Nhà máy nước Pháp Vân", 20.9560, 105.8470),
                _works("Nhà máy nước Tương Mai", 20.9880, 105.8505),
            ),
        ),
        District(
            "Long Biên",
            21.0470,
            105.8930,
            (
                _road("Nguyễn Văn Cừ", 21.0440, 105.8760),
                _road("Ngô Gia Tự", 21.0575, 105.8885),
                _road("Nguyễn Văn Linh", 21.0345, 105.8880),
                _river("Sông Hồng – Bồ Đề", 21.0380, 105.8665, tide=0.12),
                _river("Sông Đuống – Đức Giang", 21.0745, 105.8985, tide=0.1),
                _low("Ngọc Lâm", 21.0455, 105.8720),
                _market("Chợ Gia Lâm", 21.0480, 105.8800),
                _substation("TBA 110kV Gia Lâm", 21.0440, 105.8830),
                _works("Nhà máy nước Gia Lâm", 21.0510, 105.8800),
            ),
        ),
    ),
    # A port city on the Cấm and Lạch Tray rivers a few kilometres from the sea: the tide floods
    # Tam Bạc street and the riverside wards at every spring high water.
    "hai-phong": (
        District(
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
        District(
            "Lê Chân",
            20.8460,
            106.6770,
            (
                _road("Tô Hiệu", 20.8520, 106.6780),
                _road("Nguyễn Văn Linh", 20.8405, 106.6740),
                _road("Hồ Sen – Cầu Rào 2", 20.8380, 106.6850),
                _river("Sông Lạch Tray – cầu Rào", 20.8275, 106.6860, tide=0.7),
                _river("Sông Tam Bạc – Trần Nguyên Hãn", 20.8525, 106.6700, tide=0.75),
                _low("Trần Nguyên Hãn", 20.8510, 106.6690, tide=0.45),
                _low("Hàng Kênh", 20.8470, 106.6840),
                _market("Chợ Hàng", 20.8400, 106.6795),
                _substation("TBA 110kV Lê Chân", 20.8450, 106.6720),
                _works("Trạm bơm tăng áp Lê Chân", 20.8430, 106.6760),
            ),
        ),
        District(
            "Ngô Quyền",
            20.8560,
            106.7020,
            (
                _road("Lạch Tray", 20.8510, 106.6960),
                _road("Lê Hồng Phong", 20.8465, 106.7100),
                _road("Văn Cao", 20.8450, 106.7000),
                _road("Đà Nẵng", 20.8625, 106.7010),
                _river("Sông Cấm – cảng Hoàng Diệu", 20.8665, 106.6895, tide=0.9),
                _river("Sông Lạch Tray – Đằng Giang", 20.8380, 106.7050, tide=0.7),
                _low("Lạch Tray – Văn Cao", 20.8470, 106.6990),
                _market("Chợ Lũng", 20.8495, 106.7060),
                _substation("TBA 110kV Lạch Tray", 20.8480, 106.6950),
                _works("Trạm bơm tăng áp Văn Cao", 20.8445, 106.7010),
            ),
        ),
        District(
            "Hải An",
            20.8300,
            106.7300,
            (
                _road("Lê Hồng Phong – Cát Bi", 20.8300, 106.7200),
                _road("Ngô Gia Tự", 20.8265, 106.7155),
                _road("Đình Vũ", 20.8400, 106.7700),
                _river("Sông Cấm – Đông Hải", 20.8560, 106.7450, tide=0.95),
                _river("Sông Lạch Tray – Đằng Hải", 20.8250, 106.7300, tide=0.75),
                _low("Ngô Gia Tự – Cát Bi", 20.8235, 106.7185),
                _market("Chợ Cát Bi", 20.8280, 106.7185),
                _substation("TBA 110kV Cát Bi", 20.8330, 106.7150),
                _works("Trạm cấp nước Đông Hải", 20.8500, 106.7420),
            ),
        ),
        District(
            "Kiến An",
            20.8090,
            106.6290,
            (
                _road("Trần Thành Ngọ", 20.8110, 106.6330),
                _road("Trường Chinh", 20.8200, 106.6380),
                _road("Phan Đăng Lưu", 20.8050, 106.6270),
                _river("Sông Lạch Tray – cầu Niệm", 20.8290, 106.6560, tide=0.6),
                _river("Sông Đa Độ", 20.7950, 106.6300, tide=0.5),
                _low("Trần Tất Văn", 20.8080, 106.6310),
                _market("Chợ Kiến An", 20.8085, 106.6265),
                _substation("TBA 110kV Kiến An", 20.8150, 106.6200),
                _works("Nhà máy nước Kiến An", 20.8120, 106.6250),
            ),
        ),
    ),
    # Coal towns and Hạ Long Bay: the full diurnal tide of the Gulf of Tonkin at Cửa Lục and up the
    # Bạch Đằng, the Ka Long on the border at Móng Cái.
    "quang-ninh": (
        District(
            "Hạ Long",
            20.9517,
            107.0806,
            (
                _road("Quốc lộ 18 – Hà Tu", 20.9670, 107.1300),
                _road("Trần Hưng Đạo", 20.9545, 107.0845),
                _road("Hạ Long – Bãi Cháy", 20.9525, 107.0500),
                _road("Nguyễn Văn Cừ", 20.9575, 107.1000),
                _river("Cửa Lục – cầu Bãi Cháy", 20.9560, 107.0690, tide=1.0),
                _river("Sông Diễn Vọng", 21.0150, 107.1400, tide=0.8),
                _low("Cao Thắng", 20.9600, 107.0870),
                _low("Lê Thánh Tông", 20.9505, 107.0790, tide=0.5),
                _market("Chợ Hạ Long I", 20.9500, 107.0815),
                _substation("TBA 110kV Giếng Đáy", 20.9650, 107.0250),
                _works("Nhà máy nước Diễn Vọng", 21.0100, 107.1600),
            ),
        ),
        District(
            "Cẩm Phả",
            21.0167,
            107.2833,
            (
                _road("Quốc lộ 18 – Cẩm Trung", 21.0120, 107.2850),
                _road("Trần Phú", 21.0080, 107.2750),
                _river("Cảng Cửa Ông", 21.0250, 107.3500, tide=1.0),
                _river("Sông Mông Dương", 21.0650, 107.3350, tide=0.6),
                _low("Cẩm Trung", 21.0090, 107.2900),
                _market("Chợ Cẩm Đông", 21.0100, 107.3000),
                _substation("TBA 220kV Cẩm Phả", 21.0300, 107.2700),
                _works("Nhà máy nước Cẩm Phả", 21.0200, 107.2600),
            ),
        ),
        District(
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
        District(
            "Quảng Yên",
            20.9380,
            106.8030,
            (
                _road("Quốc lộ 10 – Quảng Yên", 20.9400, 106.8000),
                _river("Sông Bạch Đằng – Quảng Yên", 20.9150, 106.7950, tide=0.95),
                _river("Sông Chanh", 20.9300, 106.8250, tide=0.85),
                _low("Phong Cốc", 20.9150, 106.8200, tide=0.6),
                _market("Chợ Rừng", 20.9350, 106.8050),
                _substation("TBA 110kV Quảng Yên", 20.9450, 106.8100),
                _works("Trạm cấp nước Quảng Yên", 20.9420, 106.8080),
            ),
        ),
        District(
            "Móng Cái",
            21.5244,
            107.9653,
            (
                _road("Hùng Vương", 21.5300, 107.9650),
                _road("Quốc lộ 18 – Hải Hòa", 21.5100, 107.9800),
                _river("Sông Ka Long – cầu Bắc Luân", 21.5440, 107.9680, tide=0.55),
                _river("Sông Ka Long – Ka Long", 21.5350, 107.9600, tide=0.5),
                _low("Trần Phú", 21.5270, 107.9680),
                _market("Chợ Trung tâm Móng Cái", 21.5300, 107.9660),
                _substation("TBA 110kV Móng Cái", 21.5150, 107.9500),
                _works("Nhà máy nước Móng Cái", 21.5200, 107.9550),
            ),
        ),
    ),
    # The Hàn river between the centre and Sơn Trà; a mixed, mostly semi-diurnal tide of about a metre.
    "da-nang": (
        District(
            "Hải Châu",
            16.0471,
            108.2068,
            (
                _road("Bạch Đằng", 16.0700, 108.2245),
                _road("Nguyễn Văn Linh", 16.0600, 108.2100),
                _road("Lê Duẩn", 16.0705, 108.2165),
                _road("2 Tháng 9", 16.0400, 108.2230),
                _river("Sông Hàn – cầu Rồng", 16.0612, 108.2275, tide=0.4),
                _river("Sông Hàn – cầu Sông Hàn", 16.0720, 108.2265, tide=0.4),
                _low("Ông Ích Khiêm", 16.0660, 108.2130),
                _market("Chợ Hàn", 16.0680, 108.2240),
                _market("Chợ Cồn", 16.0680, 108.2140),
                _substation("TBA 110kV Hải Châu", 16.0550, 108.2150),
                _works("Trạm bơm tăng áp Hải Châu", 16.0500, 108.2100),
            ),
        ),
        District(
            "Thanh Khê",
            16.0640,
            108.1870,
            (
                _road("Điện Biên Phủ", 16.0650, 108.1900),
                _road("Hà Huy Tập", 16.0640, 108.1830),
                _road("Trần Cao Vân", 16.0720, 108.1950),
                _river("Kênh Phú Lộc", 16.0720, 108.1750, tide=0.3),
                _low("Điện Biên Phủ – Hà Huy Tập", 16.0655, 108.1840),
                _market("Chợ Tam Giác", 16.0690, 108.1970),
                _substation("TBA 110kV Thanh Khê", 16.0600, 108.1850),
                _works("Nhà máy nước Sân Bay", 16.0590, 108.1970),
            ),
        ),
        District(
            "Sơn Trà",
            16.0860,
            108.2440,
            (
                _road("Ngô Quyền", 16.0700, 108.2350),
                _road("Phạm Văn Đồng", 16.0715, 108.2410),
                _road("Võ Nguyên Giáp", 16.0650, 108.2460),
                _river("Sông Hàn – An Hải", 16.0650, 108.2300, tide=0.4),
                _river("Âu thuyền Thọ Quang", 16.0980, 108.2500, tide=0.5),
                _low("Ngô Quyền – An Hải", 16.0620, 108.2350),
                _market("Chợ An Hải Đông", 16.0580, 108.2380),
                _substation("TBA 110kV An Đồn", 16.0800, 108.2300),
                _works("Trạm bơm tăng áp An Hải", 16.0640, 108.2390),
            ),
        ),
        District(
            "Liên Chiểu",
            16.0750,
            108.1500,
            (
                _road("Tôn Đức Thắng", 16.0650, 108.1650),
                _road("Nguyễn Lương Bằng", 16.0760, 108.1500),
                _road("Nguyễn Tất Thành", 16.0800, 108.1600),
                _river("Sông Cu Đê – Nam Ô", 16.1190, 108.1280, tide=0.45),
                _low("Âu Cơ", 16.0700, 108.1450),
                _market("Chợ Hòa Khánh", 16.0720, 108.1500),
                _substation("TBA 110kV Hòa Khánh", 16.0750, 108.1420),
                _works("Trạm cấp nước Hòa Khánh", 16.0700, 108.1400),
            ),
        ),
    ),
}
