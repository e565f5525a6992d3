"""Device registration files: a GeoJSON FeatureCollection of Points (RFC 7946, `[lon, lat]`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ioc_core.errors import IocError
from ioc_core.models import DeviceIn

MAX_FILE_BYTES = 50 * 1024 * 1024


class ImportFileError(IocError):
    """The file cannot be imported as a whole (not GeoJSON, too large, unreadable)."""


# The same failure, by the name each import says it under.
DeviceFileError = AreaFileError = ImportFileError


def read_json(path: Path, *, max_bytes: int) -> Any:
    """A JSON file a stranger made (devices' or areas'): an `ImportFileError` naming the file when
    it is unreadable, too large or not JSON."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ImportFileError(f"{path}: {size} bytes, limit {max_bytes}")
        return json.loads(path.read_bytes())
    except OSError as exc:
        raise ImportFileError(f"{path}: cannot read: {exc.strerror}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ImportFileError(f"{path}: not JSON: {exc}") from exc


def read_devices(path: Path) -> tuple[list[DeviceIn], list[str]]:
    """The valid devices of the file, and one message per feature that is not."""
    document = read_json(path, max_bytes=MAX_FILE_BYTES)
    if not isinstance(document, dict) or document.get("type") != "FeatureCollection":
        raise DeviceFileError(f"{path}: expected a GeoJSON FeatureCollection")
    features = document.get("features")
    if not isinstance(features, list):
        raise DeviceFileError(f"{path}: 'features' must be a list")
    devices: list[DeviceIn] = []
    problems: list[str] = []
    for index, feature in enumerate(features):
        try:
            devices.append(_device_of(feature))
        except (ValueError, ValidationError) as exc:
            detail = (
                "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
                if isinstance(exc, ValidationError)
                else str(exc)
            )
            problems.append(f"feature {index}: {detail}")
    return devices, problems


def _device_of(feature: Any) -> DeviceIn:
    if not isinstance(feature, dict) or feature.get("type") != "Feature":
        raise ValueError("not a GeoJSON Feature")
    geometry = feature.get("geometry")
    if not isinstance(geometry, dict) or geometry.get("type") != "Point":
        raise ValueError("geometry must be a Point")
    coordinates = geometry.get("coordinates")
    if (
        not isinstance(coordinates, list)
        or len(coordinates) < 2
        or not all(isinstance(c, int | float) and not isinstance(c, bool) for c in coordinates[:2])
    ):
        raise ValueError("Point coordinates must be [lon, lat]")
    properties = feature.get("properties")
    if not isinstance(properties, dict):
        raise ValueError("properties must be an object")
    known = {"id", "city", "domain", "name", "district", "thresholds"}
    body = {k: v for k, v in properties.items() if k in known}
    body["location"] = {"lon": coordinates[0], "lat": coordinates[1]}
    return DeviceIn.model_validate(body)
