"""Area files: a GeoJSON FeatureCollection of Polygons and MultiPolygons (RFC 7946), imported as a
whole or not at all (`ioc areas import`)."""

from __future__ import annotations

from pathlib import Path

from ioc.devices_file import AreaFileError, read_json
from ioc_core.areas import AreaError, AreaIn, parse_collection
from ioc_core.errors import IocError

# A country's wards with detailed boundaries stay well below this.
MAX_FILE_BYTES = 512 * 1024 * 1024


def read_areas(path: Path, *, max_vertices: int) -> tuple[list[AreaIn], list[AreaError]]:
    """The file's areas, and an error for each feature that cannot be one."""
    document = read_json(path, max_bytes=MAX_FILE_BYTES)
    try:
        return parse_collection(document, max_vertices=max_vertices)
    except IocError as exc:
        raise AreaFileError(f"{path}: {exc}") from exc
