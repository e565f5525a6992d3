"""Dead letters: device messages the pipeline rejected, with their reason, and their replay once
the cause is fixed (typically: register the unknown device, then replay its letters). Admin
without a scope limit: a rejected message may name no registered device, so it cannot be placed
in a scope, and a replay puts readings into any city's pipeline."""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from api.audit_trail import Audit, AuditTrail, Change, Subject
from api.auth import Admin, Principal
from api.deps import AppSettings, Db
from api.pagination import Page, decode_int_cursor, encode_cursor, paginate
from api.params import within_time_bounds
from api.problems import PROBLEM
from api.replay import Replayer
from ioc_core.audit import DEAD_LETTER, DEAD_LETTER_REPLAYED
from ioc_core.settings import Settings
from ioc_core.storage import Database, DeadLetterFilter, DeadLetterRow, ReplayCandidate
from ioc_core.telemetry import DEVICE_ID_PATTERN

router = APIRouter(tags=["dead letters"])

DeadLetterId = Annotated[int, Path(ge=1, le=2**63 - 1, description="dead letter id")]
_REASON_PATTERN = "^[a-z_]{1,64}$"
_RFC3339 = r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$"
# An MQTT topic name is UTF-8 without U+0000 (which PostgreSQL's text refuses too).
_TOPIC_PATTERN = r"^[^\x00]{1,512}$"
_UNSCOPED_ONLY = "dead letters need an admin key without a city, domain or area limit"


class DeadLetterItem(BaseModel):
    id: str
    received_at: datetime
    topic: str
    reason: str
    detail: str
    payload: str = Field(description="the raw payload as UTF-8 text, cut at 4 KiB")
    payload_size: int = Field(description="size of the original payload in bytes")
    device_id: str | None = Field(
        description="the device the topic names, registered or not; null when the topic names none"
    )
    replayable: bool = Field(
        description="whether the whole payload is kept byte for byte (not for payloads over 64 KiB, nor"
        " for some letters stored before payloads were kept whole), so that it can be replayed"
    )
    replayed_at: datetime | None = Field(description="when a replay sent it back into the pipeline")
    replay_attempted_at: datetime | None = Field(description="the last replay that took it")
    replay_reason: str | None = Field(
        description="why the last replay refused it again (its reason code); null once replayed"
    )
    replay_detail: str | None = Field(description="the last refusal's detail")


class MqttProperties(BaseModel):
    """The MQTT 5 properties the publisher set (absent: not set)."""

    payload_format_indicator: int | None = Field(default=None, description="1: the payload is UTF-8 text")
    message_expiry_interval: int | None = Field(
        default=None, description="seconds the message had left when the gateway received it"
    )
    content_type: str | None = None
    response_topic: str | None = None
    correlation_data_base64: str | None = None
    user_properties: list[tuple[str, str]] | None = Field(default=None, description="name and value pairs")
    undecoded_base64: str | None = Field(
        default=None, description="properties that could not be decoded, as they came"
    )


class MqttDelivery(BaseModel):
    qos: int | None = None
    retain: bool | None = None
    dup: bool | None = Field(default=None, description="the broker's redelivery flag")
    packet_id: int | None = None
    properties: MqttProperties | None = Field(
        default=None, description="MQTT 5 properties its publisher set; null when none"
    )


class DeadLetterDetailItem(DeadLetterItem):
    payload_base64: str | None = Field(
        description="the payload byte for byte (at most 64 KiB), base64; null when not known exactly"
    )
    mqtt: MqttDelivery | None = Field(description="how the broker delivered it; null when not recorded")


class ReplayFilter(BaseModel):
    """Which dead letters to replay: those matching every given field and not replayed yet."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        json_schema_extra={
            "examples": [{"device_id": "hn-flood-001", "reason": "unknown_device"}],
        },
    )

    device_id: str | None = Field(
        default=None, pattern=f"^{DEVICE_ID_PATTERN.pattern}$", description="the device the topic names"
    )
    reason: str | None = Field(default=None, pattern=_REASON_PATTERN, description="the reason code")
    topic: str | None = Field(default=None, pattern=_TOPIC_PATTERN, description="the exact MQTT topic")
    from_: str | None = Field(
        default=None,
        alias="from",
        pattern=_RFC3339,
        description="received at or after, RFC 3339 with an offset",
        json_schema_extra={"format": "date-time"},
    )
    to: str | None = Field(
        default=None,
        pattern=_RFC3339,
        description="received before (exclusive), RFC 3339 with an offset",
        json_schema_extra={"format": "date-time"},
    )
    cursor: str | None = Field(
        default=None, max_length=200, description="`next` of the previous replay answer, to go on after it"
    )


class ReplayResult(BaseModel):
    replayed: int = Field(description="letters sent back into the pipeline by this request")
    refused: int = Field(description="letters validation refused again (see their `replay_reason`)")
    next: str | None = Field(
        default=None,
        description="more letters may match beyond this request's batch (IOC_DEAD_LETTER_REPLAY_BATCH):"
        " post the same filter with this as `cursor` to go on; null when none are left",
    )


def _unscoped(principal: Principal) -> bool:
    return principal.cities is None and principal.domains is None and principal.areas is None


def _require_unscoped_reader(principal: Principal) -> None:
    # Reading changes nothing and a refused read of a list is not recorded, as for other lists.
    if not _unscoped(principal):
        raise HTTPException(403, _UNSCOPED_ONLY)


async def _require_unscoped_replayer(audit: AuditTrail, subject: Subject) -> None:
    # A replay is a change: its refusal goes to the audit log, as a creation beyond a scope does.
    if not _unscoped(audit.principal):
        raise await audit.refuse(subject, 403, _UNSCOPED_ONLY)


def _item(row: DeadLetterRow) -> dict[str, Any]:
    return {**row.model_dump(), "id": str(row.id)}


@router.get(
    "/v1/dead-letters",
    response_model=Page[DeadLetterItem],
    summary="Rejected device messages with their reason, newest first (admin).",
    responses={400: PROBLEM},
)
async def dead_letters(
    database: Db,
    principal: Admin,
    reason: Annotated[str | None, Query(pattern=_REASON_PATTERN, description="only this reason")] = None,
    device_id: Annotated[
        str | None,
        Query(
            pattern=f"^{DEVICE_ID_PATTERN.pattern}$", description="only those whose topic names this device"
        ),
    ] = None,
    topic: Annotated[str | None, Query(pattern=_TOPIC_PATTERN, description="only this topic")] = None,
    replayed: Annotated[bool | None, Query(description="only replayed ones (true) or the others")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="page size")] = 100,
    cursor: Annotated[str | None, Query(max_length=200, description="`next` of the previous page")] = None,
) -> Page[DeadLetterItem]:
    _require_unscoped_reader(principal)
    before = decode_int_cursor(cursor)
    return await paginate(
        lambda n: database.dead_letters.page(
            limit=n, before_id=before, reason=reason, device_id=device_id, topic=topic, replayed=replayed
        ),
        limit,
        cursor_of=lambda row: row.id,
        item=lambda row: DeadLetterItem(**_item(row)),
    )


@router.get(
    "/v1/dead-letters/{letter_id}",
    response_model=DeadLetterDetailItem,
    summary="One dead letter with its payload byte for byte (base64) and delivery flags (admin).",
    responses={404: PROBLEM},
)
async def dead_letter(database: Db, principal: Admin, letter_id: DeadLetterId) -> DeadLetterDetailItem:
    _require_unscoped_reader(principal)
    letter = await database.dead_letters.get(letter_id)
    return DeadLetterDetailItem(
        **_item(letter),
        payload_base64=None if letter.raw is None else base64.b64encode(letter.raw).decode("ascii"),
    )


@router.post(
    "/v1/dead-letters/{letter_id}/replay",
    status_code=202,
    response_model=ReplayResult,
    summary="Replay one dead letter through the gateway's validation into the pipeline, once (admin).",
    description="`replayed` is 1 when the letter's message was accepted and its records are on the"
    " bus (the processors store them within moments), 0 when it was replayed before or validation"
    " refused it again (`refused` 1; the letter then says why in `replay_reason`).",
    responses={403: PROBLEM, 404: PROBLEM, 503: PROBLEM},
)
async def replay_dead_letter(
    settings: AppSettings, database: Db, audit: Audit, principal: Admin, letter_id: DeadLetterId
) -> ReplayResult:
    subject = Subject(DEAD_LETTER_REPLAYED, DEAD_LETTER, str(letter_id), None, None)
    await _require_unscoped_replayer(audit, subject)
    async with audit.change(subject) as change:
        letters = await database.dead_letters.claim_one_for_replay(letter_id, within=change.transaction)
        return await _replay(settings, database, letters, change)


@router.post(
    "/v1/dead-letters/replay",
    status_code=202,
    response_model=ReplayResult,
    summary="Replay the dead letters matching a filter, once each, oldest first (admin).",
    description="Takes the letters not replayed yet whose payload is kept whole and that match every"
    " given field; an empty body takes them all. One request replays at most"
    " IOC_DEAD_LETTER_REPLAY_BATCH letters: when more may match, `next` says where to go on.",
    responses={400: PROBLEM, 403: PROBLEM, 503: PROBLEM},
)
async def replay_dead_letters(
    settings: AppSettings,
    database: Db,
    audit: Audit,
    principal: Admin,
    selection: Annotated[ReplayFilter | None, Body()] = None,
) -> ReplayResult:
    selection = selection or ReplayFilter()
    received_from, received_to = _instant(selection.from_, "from"), _instant(selection.to, "to")
    if received_from is not None and received_to is not None and received_from >= received_to:
        raise HTTPException(400, "`from` must be before `to`")
    after = decode_int_cursor(selection.cursor)
    wanted = DeadLetterFilter(
        device_id=selection.device_id,
        reason=selection.reason,
        topic=selection.topic,
        received_from=received_from,
        received_to=received_to,
    )
    filter_detail = selection.model_dump(by_alias=True, exclude_none=True, exclude={"cursor"})
    # A bulk replay is about no one letter: its entry names the filter, and the letters it took.
    subject = Subject(DEAD_LETTER_REPLAYED, DEAD_LETTER, "*", None, None)
    await _require_unscoped_replayer(audit, subject)
    batch = settings.dead_letter_replay_batch
    async with audit.change(subject, filter=filter_detail) as change:
        letters = await database.dead_letters.claim_for_replay(
            wanted, after_id=after, limit=batch, within=change.transaction
        )
        result = await _replay(settings, database, letters, change)
    if len(letters) == batch:
        result.next = encode_cursor(letters[-1].id)
    return result


# The most letter ids an audit entry lists; beyond, it gives their count only.
_AUDITED_IDS = 100


async def _replay(
    settings: Settings, database: Database, letters: list[ReplayCandidate], change: Change
) -> ReplayResult:
    """Replay the claimed letters and mark them in the change's transaction, with its audit entry."""
    outcome = await Replayer(settings, database).replay(letters)
    await database.dead_letters.finish_replay(outcome.replayed, outcome.refused, within=change.transaction)
    change.detail.update(
        replayed=len(outcome.replayed), refused=len(outcome.refused), records=outcome.records
    )
    if len(outcome.replayed) <= _AUDITED_IDS:
        change.detail["letters"] = [str(i) for i in outcome.replayed]
    return ReplayResult(replayed=len(outcome.replayed), refused=len(outcome.refused))


def _instant(value: str | None, name: str) -> datetime | None:
    """An RFC 3339 time with an offset, in years 1970 to 2200 (as every time the API takes)."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None or not within_time_bounds(parsed):
        raise HTTPException(
            400,
            f"`{name}` must be RFC 3339 with an offset in years 1970 to 2200, like 2026-11-21T08:00:00+07:00",
        )
    return parsed
