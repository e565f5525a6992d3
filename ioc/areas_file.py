"""Area files: a GeoJSON FeatureCollection of Polygons and MultiPolygons (RFC 7946), imported as a
whole or not at all (`ioc areas import`)."""

from __future__ import annotations

import json
from pathlib import Path

from ioc_core.areas import AreaError, AreaIn, parse_collection
from ioc_core.errors import IocError

# A country's wards with detailed boundaries stay well below this.
MAX_FILE_BYTES = 512 * 1024 * 1024


class AreaFileError(IocError):
    """The file cannot be imported as a whole (unreadable, not GeoJSON, too large)."""


def read_areas(path: Path, *, max_vertices: int) -> tuple[list[AreaIn], list[AreaError]]:
    """The file's areas, and an error for each feature that cannot be one."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise AreaFileError(f"{path}: {size} bytes, limit {MAX_FILE_BYTES}")
        document = json.loads(path.read_bytes())
    except OSError as exc:
        raise AreaFileError(f"{path}: cannot read: {exc.strerror}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise AreaFileError(f"{path}: not JSON: {exc}") from exc
    try:
        return parse_collection(document, max_vertices=max_vertices)
    except IocError as exc:
        raise AreaFileError(f"{path}: {exc}") from exc
