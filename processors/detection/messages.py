"""Operator messages in Vietnamese and English: the place, the value with its unit, and the limit.

Vietnamese writes a decimal comma and groups thousands with a dot (4,70 m; 1.250,5 kW).
"""

from __future__ import annotations

from collections.abc import Sequence

from ioc_core.domains.base import Metric
from ioc_core.places import city_name

Texts = tuple[str, str]  # (Vietnamese, English)

_SEVERITY_LIMIT_NAMES = {"critical": ("nguy hiểm", "danger"), "medium": ("cảnh báo", "warning")}
_STATION_NAMES_SHOWN = 3


def number(value: float, decimals: int, *, vietnamese: bool) -> str:
    text = f"{value:,.{max(decimals, 0)}f}"
    if vietnamese:
        text = text.replace(",", "\0").replace(".", ",").replace("\0", ".")
    return text


def quantity(metric: Metric, value: float, *, vietnamese: bool) -> str:
    """A value as an operator reads it: fractions as percentages, others with their unit."""
    if metric.unit == "fraction":
        percent = value * 100
        decimals = 0 if abs(percent - round(percent)) < 0.05 else 1
        return f"{number(percent, decimals, vietnamese=vietnamese)}%"
    unit = (metric.unit_vi or metric.unit) if vietnamese else metric.unit
    text = number(value, metric.decimals, vietnamese=vietnamese)
    return f"{text} {unit}" if unit else text


def duration(seconds: float, *, vietnamese: bool) -> str:
    minutes = round(seconds / 60)
    if minutes >= 120:
        hours = number(minutes / 60, 0 if minutes % 60 == 0 else 1, vietnamese=vietnamese)
        return f"{hours} giờ" if vietnamese else f"{hours} h"
    if minutes >= 1:
        return f"{minutes} phút" if vietnamese else f"{minutes} min"
    whole = round(seconds)
    return f"{whole} giây" if vietnamese else f"{whole} s"


def _both(metric: Metric, value: float) -> Texts:
    return quantity(metric, value, vietnamese=True), quantity(metric, value, vietnamese=False)


def threshold_texts(
    place: str, metric: Metric, value: float, limit: float, *, above: bool, severity: str
) -> Texts:
    limit_vi, limit_en = _SEVERITY_LIMIT_NAMES.get(severity, _SEVERITY_LIMIT_NAMES["medium"])
    (value_vi, value_en), (edge_vi, edge_en) = _both(metric, value), _both(metric, limit)
    side_vi, side_en = ("vượt", "above") if above else ("dưới", "below")
    return (
        f"{metric.label_vi} tại {place} là {value_vi}, {side_vi} ngưỡng {limit_vi} {edge_vi}",
        f"{metric.label_en} at {place} is {value_en}, {side_en} the {limit_en} limit {edge_en}",
    )


def rate_texts(
    place: str, metric: Metric, change: float, limit: float, *, rise: bool, now: float, window_s: float
) -> Texts:
    (change_vi, change_en), (limit_vi, limit_en), (now_vi, now_en) = (
        _both(metric, change),
        _both(metric, limit),
        _both(metric, now),
    )
    verb_vi, verb_en = ("tăng", "rose by") if rise else ("giảm", "fell by")
    within_vi, within_en = duration(window_s, vietnamese=True), duration(window_s, vietnamese=False)
    return (
        f"{metric.label_vi} tại {place} {verb_vi} {change_vi} trong {within_vi} (hiện {now_vi}),"
        f" quá mức cho phép {limit_vi}",
        f"{metric.label_en} at {place} {verb_en} {change_en} within {within_en} (now {now_en}),"
        f" more than the allowed {limit_en}",
    )


def zscore_texts(place: str, metric: Metric, value: float, usual: float, deviations: float) -> Texts:
    (value_vi, value_en), (usual_vi, usual_en) = _both(metric, value), _both(metric, usual)
    sigma_vi, sigma_en = number(deviations, 1, vietnamese=True), number(deviations, 1, vietnamese=False)
    return (
        f"{metric.label_vi} tại {place} là {value_vi}, bất thường so với mức gần đây {usual_vi}"
        f" (lệch {sigma_vi} lần độ lệch chuẩn)",
        f"{metric.label_en} at {place} is {value_en}, unusual against its recent level {usual_en}"
        f" ({sigma_en} standard deviations away)",
    )


def flatline_texts(place: str, metric: Metric, value: float, seconds: float) -> Texts:
    value_vi, value_en = _both(metric, value)
    for_vi, for_en = duration(seconds, vietnamese=True), duration(seconds, vietnamese=False)
    return (
        f"{metric.label_vi} tại {place} giữ nguyên {value_vi} suốt {for_vi}; cảm biến có thể bị kẹt",
        f"{metric.label_en} at {place} has stayed at exactly {value_en} for {for_en};"
        " the sensor may be stuck",
    )


_RECOVERED = {
    "threshold": ("đã trở lại trong ngưỡng", "is back within limits"),
    "rate": ("đã hết biến động nhanh", "is no longer changing fast"),
    "zscore": ("đã trở lại mức thường thấy", "is back to its usual level"),
    "flatline": ("đã thay đổi trở lại", "is changing again"),
}


def recovered_texts(place: str, metric: Metric, value: float | None, kind: str) -> Texts:
    phrase_vi, phrase_en = _RECOVERED.get(kind, ("đã trở lại bình thường", "is back to normal"))
    if value is None:
        return f"{metric.label_vi} tại {place} {phrase_vi}", f"{metric.label_en} at {place} {phrase_en}"
    value_vi, value_en = _both(metric, value)
    return (
        f"{metric.label_vi} tại {place} {phrase_vi}: {value_vi}",
        f"{metric.label_en} at {place} {phrase_en}: {value_en}",
    )


def offline_texts(place: str, *, active: bool) -> Texts:
    if active:
        return (
            f"Thiết bị {place} mất kết nối: không còn nhận được dữ liệu",
            f"Device {place} is offline: no data is arriving",
        )
    return f"Thiết bị {place} đã kết nối trở lại", f"Device {place} is back online"


def zone_flood_texts(
    zone_vi: str, zone_en: str, city: str, station_names: Sequence[str], *, active: bool
) -> Texts:
    """A flood zone's (catchment, ward or district) alarm texts, named in each language."""
    where_vi = f"{zone_vi} ({city_name(city)})"
    where_en = f"{zone_en} ({city_name(city)})"
    if not active:
        return (
            f"Nguy cơ ngập úng diện rộng tại {where_vi} đã qua:"
            " không còn trạm nào vừa có mưa vừa có nước dâng",
            f"Flood risk across {where_en} has passed: no station reports both rain and rising water",
        )
    shown = ", ".join(station_names[:_STATION_NAMES_SHOWN])
    more = len(station_names) - _STATION_NAMES_SHOWN
    names_vi = f"{shown} và {more} trạm khác" if more > 0 else shown
    names_en = f"{shown} and {more} more" if more > 0 else shown
    count = len(station_names)
    return (
        f"Nguy cơ ngập úng diện rộng tại {where_vi}: {count} trạm đang có mưa và nước dâng ({names_vi})",
        f"Flood risk across {where_en}: {count} stations report rain and rising water ({names_en})",
    )
