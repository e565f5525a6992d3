"""Schemathesis hooks for the scoped runs of `test_api_schema` (loaded through SCHEMATHESIS_HOOKS):
the ids of real devices and alarms of two cities mixed into generated path parameters, so that
generated requests reach real objects on both sides of a key's scope; and the checks those runs
select by name.

What the run is about comes in SCHEMA_SCOPE_RUN, as JSON: `device_ids` and `alarm_ids` (of both
cities), `other_city` (the city the key must not see) and `other_device_ids`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import schemathesis
from hypothesis import strategies as st

_RUN: dict[str, Any] = json.loads(os.environ.get("SCHEMA_SCOPE_RUN", "{}"))
_KNOWN: dict[str, list[Any]] = {
    "device_id": _RUN.get("device_ids", []),
    "alarm_id": _RUN.get("alarm_ids", []),
}
_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@schemathesis.hook
def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any]) -> Any:
    """Half the time, a real device or alarm of either city in place of the generated id."""
    if not path_parameters:
        return st.just(path_parameters)
    choices = [st.just(path_parameters)]
    for name, ids in _KNOWN.items():
        if name in path_parameters and ids:
            choices.append(st.sampled_from(ids).map(lambda known, n=name: {**path_parameters, n: known}))
    return st.one_of(*choices) if len(choices) > 1 else st.just(path_parameters)


def _mentions(value: Any, city: str, device_ids: set[str]) -> Iterator[str]:
    """Where in a JSON answer an object of `city` shows: its city, or one of its devices' ids."""
    if isinstance(value, dict):
        if value.get("city") == city:
            yield f"an object of {city}: {json.dumps(value)[:300]}"
        for item in value.values():
            yield from _mentions(item, city, device_ids)
    elif isinstance(value, list):
        for item in value:
            yield from _mentions(item, city, device_ids)
    elif isinstance(value, str) and value in device_ids:
        yield f"the id of a device of {city}: {value}"


@schemathesis.check
def no_object_of_another_city(ctx: Any, response: Any, case: Any) -> None:
    """A key scoped to some cities never sees an object of another: in no list, no lookup, no
    answer to a change (an error answer may repeat the id asked for, which reveals nothing)."""
    if response.status_code >= 400 or "json" not in response.headers.get("content-type", [""])[0]:
        return
    city, device_ids = _RUN["other_city"], set(_RUN.get("other_device_ids", []))
    found = list(_mentions(response.json(), city, device_ids))
    if found:
        raise AssertionError(f"{case.method} {case.formatted_path} showed {found[0]}")


@schemathesis.check
def no_write_succeeds(ctx: Any, response: Any, case: Any) -> None:
    """A viewer key changes nothing: every write is refused."""
    if case.method.upper() in _WRITES and response.status_code < 400:
        raise AssertionError(f"{case.method} {case.formatted_path} succeeded ({response.status_code})")
