"""History exports: what a request for one may ask (a domain's metrics, a bucket width, a bounded
range) and the encoders that turn chunks of exported rows into CSV or Parquet bytes.

Exports stream: the storage reads them in chunks (`ReadingStore.export`) and each encoder turns a
chunk into bytes as soon as it comes, keeping nothing of the chunks before it, so an export of
any length takes the memory of one chunk. The API (`GET /v1/export`) and `ioc export` share it.

Rows come in the order of `export_columns`: without a bucket, (ts, device_id, one value per
metric); with one, (bucket, device_id, readings, then each metric's avg, min and max).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol, get_args

from ioc_core.domains import Domain, Metric
from ioc_core.errors import ValidationError

ExportFormat = Literal["csv", "parquet"]
FORMATS: tuple[ExportFormat, ...] = get_args(ExportFormat)
MEDIA_TYPES: dict[ExportFormat, str] = {
    "csv": "text/csv; charset=utf-8",
    "parquet": "application/vnd.apache.parquet",
}
# The statistics a bucketed export gives for each metric, in their column order.
BUCKET_STATISTICS = ("avg", "min", "max")

# The series endpoint's bucket syntax: a whole number and a unit.
_BUCKET = re.compile(r"^([1-9][0-9]{0,5})(s|m|h|d)$")
_BUCKET_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}

ColumnKind = Literal["time", "text", "value", "count"]


@dataclass(frozen=True)
class ExportColumn:
    name: str
    kind: ColumnKind


def parse_format(text: str) -> ExportFormat:
    for known in FORMATS:
        if text == known:
            return known
    raise ValidationError(f"format must be {' or '.join(FORMATS)}, not {text[:32]!r}")


def parse_bucket(text: str) -> timedelta:
    """A bucket width as the series endpoint takes it: `30s`, `5m`, `1h`, `1d`."""
    match = _BUCKET.fullmatch(text)
    if match is None:
        raise ValidationError("bucket must be a whole number and a unit s, m, h or d, like 30s, 5m, 1h, 1d")
    return timedelta(**{_BUCKET_UNITS[match.group(2)]: int(match.group(1))})


def choose_metrics(domain: Domain, requested: str | None) -> tuple[Metric, ...]:
    """The metrics a comma list names, in the list's order (repeats once); all of the domain's,
    in their declared order, when there is no list."""
    if requested is None:
        return domain.metrics
    chosen: dict[str, Metric] = {}
    for name in (part.strip() for part in requested.split(",")):
        if not name:
            continue
        metric = domain.metric(name)
        if metric is None:
            known = ", ".join(m.name for m in domain.metrics)
            raise ValidationError(
                f"{name[:64]!r} is not a metric of the {domain.name} domain; known: {known}"
            )
        chosen.setdefault(metric.name, metric)
    if not chosen:
        raise ValidationError("metrics must name at least one metric, comma-separated")
    return tuple(chosen.values())


def check_range(start: datetime, end: datetime, max_days: int | None = None) -> None:
    """Both ends carry an offset, `start` comes first, and the range spans at most `max_days`."""
    for value, name in ((start, "from"), (end, "to")):
        if value.tzinfo is None:
            raise ValidationError(f"`{name}` must be RFC 3339 with an offset, like 2026-11-21T08:00:00+07:00")
    if start >= end:
        raise ValidationError("`from` must be before `to`")
    if max_days is not None and end - start > timedelta(days=max_days):
        raise ValidationError(
            f"an export spans at most {max_days} days, not {(end - start) / timedelta(days=1):.6g}:"
            " export a longer period in parts"
        )


def export_columns(metrics: Sequence[Metric], *, bucketed: bool) -> list[ExportColumn]:
    if not bucketed:
        return [
            ExportColumn("ts", "time"),
            ExportColumn("device_id", "text"),
            *(ExportColumn(m.name, "value") for m in metrics),
        ]
    return [
        ExportColumn("bucket", "time"),
        ExportColumn("device_id", "text"),
        ExportColumn("readings", "count"),
        *(ExportColumn(f"{m.name}_{statistic}", "value") for m in metrics for statistic in BUCKET_STATISTICS),
    ]


def file_name(
    city: str | None, domain: str, start: datetime, end: datetime, export_format: ExportFormat
) -> str:
    """`<city or all>-<domain>-<from>-<to>.<format>`, times in UTC without the characters file
    systems refuse (`:`)."""
    stamps = (moment.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ") for moment in (start, end))
    return f"{city or 'all'}-{domain}-{'-'.join(stamps)}.{export_format}"


class Encoder(Protocol):
    """Bytes of an export: `start` once, `encode` for each chunk of rows, `finish` once."""

    def start(self) -> bytes: ...

    def encode(self, rows: Sequence[Sequence[Any]]) -> bytes: ...

    def finish(self) -> bytes: ...


def encoder(export_format: ExportFormat, columns: Sequence[ExportColumn]) -> Encoder:
    if export_format == "parquet":
        return ParquetEncoder(columns)
    return CsvEncoder(columns)


def _utc_text(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


class CsvEncoder:
    """RFC 4180 CSV with a header row: times in UTC as ISO 8601 (`2026-11-20T07:59:00Z`), numbers
    as Python writes them (every float reads back exactly), an absent value as an empty field."""

    def __init__(self, columns: Sequence[ExportColumn]) -> None:
        self._names = [c.name for c in columns]
        self._times = [i for i, c in enumerate(columns) if c.kind == "time"]

    def start(self) -> bytes:
        return self._write([self._names])

    def encode(self, rows: Sequence[Sequence[Any]]) -> bytes:
        if not self._times:
            return self._write(rows)
        converted = []
        for row in rows:
            values = list(row)
            for index in self._times:
                if values[index] is not None:
                    values[index] = _utc_text(values[index])
            converted.append(values)
        return self._write(converted)

    def finish(self) -> bytes:
        return b""

    @staticmethod
    def _write(rows: Sequence[Sequence[Any]]) -> bytes:
        text = io.StringIO()
        csv.writer(text).writerows(rows)
        return text.getvalue().encode()


class _DrainedSink(io.RawIOBase):
    """Where the Parquet writer writes: it keeps what was written only until `drain` takes it."""

    def __init__(self) -> None:
        super().__init__()
        self._parts: list[bytes] = []
        self._position = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        part = bytes(data)
        self._parts.append(part)
        self._position += len(part)
        return len(part)

    def tell(self) -> int:
        # The writer records where each row group starts in the footer: the position counts every
        # byte written, drained or not.
        return self._position

    def drain(self) -> bytes:
        written = b"".join(self._parts)
        self._parts.clear()
        return written


class ParquetEncoder:
    """Parquet with an explicit schema (times `timestamp[us, tz=UTC]`, `device_id` string, values
    float64, `readings` int64): one row group per chunk, whose bytes leave with that chunk; the
    footer comes with `finish`."""

    def __init__(self, columns: Sequence[ExportColumn]) -> None:
        # Imported here: only Parquet exports need pyarrow, and it takes a while to load.
        import pyarrow as pa
        import pyarrow.parquet as pq

        types = {
            "time": pa.timestamp("us", tz="UTC"),
            "text": pa.string(),
            "value": pa.float64(),
            "count": pa.int64(),
        }
        self._pa = pa
        self._schema = pa.schema([pa.field(c.name, types[c.kind]) for c in columns])
        self._sink = _DrainedSink()
        self._writer = pq.ParquetWriter(self._sink, self._schema)

    def start(self) -> bytes:
        return self._sink.drain()

    def encode(self, rows: Sequence[Sequence[Any]]) -> bytes:
        if not rows:
            return b""
        pa = self._pa
        columns = zip(*rows, strict=True)
        arrays = [pa.array(values, type=f.type) for values, f in zip(columns, self._schema, strict=True)]
        self._writer.write_table(pa.Table.from_arrays(arrays, schema=self._schema))
        return self._sink.drain()

    def finish(self) -> bytes:
        self._writer.close()
        return self._sink.drain()
