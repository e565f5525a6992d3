"""Agency webhook endpoints (contract §6 and §8): register, list, change, remove; the delivery log
and retrying a failed delivery. Admin only; an admin limited to some cities or domains manages
only endpoints whose filter lies within its scope."""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from api.audit_trail import Audit, AuditTrail, Subject
from api.auth import Admin, Principal
from api.deps import AppSettings, Db
from api.pagination import Page, decode_int_cursor, decode_text_cursor, paginate
from api.params import Cursor, comma_list
from api.problems import PROBLEM
from ioc_core.audit import (
    WEBHOOK,
    WEBHOOK_CREATE,
    WEBHOOK_DELETE,
    WEBHOOK_DELIVERY_RETRY,
    WEBHOOK_READ,
    WEBHOOK_UPDATE,
    redacted_url,
)
from ioc_core.errors import ConflictError
from ioc_core.storage.webhooks import DeliveryRow, EndpointRow
from ioc_core.webhook_targets import allowed_addresses, parse_url, policy_of
from ioc_core.webhooks import WebhookError, WebhookFilter, new_secret

router = APIRouter(tags=["webhooks"])

WebhookId = Annotated[str, Path(pattern="^wh_[0-9a-f]{16}$", description="webhook id")]
DeliveryId = Annotated[int, Path(ge=1, le=2**63 - 1, description="delivery id")]
DeliveryState = Literal["pending", "delivered", "failed"]
DELIVERY_STATES: tuple[DeliveryState, ...] = ("pending", "delivered", "failed")


class WebhookIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "url": "https://canh-bao.example.gov.vn/hooks/ioc",
                    "description": "Ban Chỉ huy PCTT Hà Nội",
                    "filter": {"cities": ["ha-noi"], "domains": ["flood"], "min_severity": "high"},
                }
            ]
        },
    )

    url: str = Field(min_length=1, max_length=2048, description="http(s) URL the events are POSTed to")
    description: str | None = Field(default=None, max_length=500)
    filter: WebhookFilter = Field(default_factory=WebhookFilter)


class WebhookPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, min_length=1, max_length=2048)
    description: str | None = Field(default=None, max_length=500)
    filter: WebhookFilter | None = Field(default=None, description="replaces the whole filter")
    enabled: bool | None = Field(
        default=None, description="true turns a disabled endpoint (by a 410, say) back on; false pauses it"
    )


class Webhook(BaseModel):
    id: str
    url: str
    description: str | None
    filter: WebhookFilter
    enabled: bool
    disabled_at: datetime | None
    disabled_reason: str | None
    created_by: str | None
    created_at: datetime


class NewWebhook(Webhook):
    secret: str = Field(description="the signing secret (`whsec_…`), shown this once only")


class Attempt(BaseModel):
    attempted_at: datetime
    status_code: int | None = Field(description="the endpoint's answer; null when there was none")
    latency_ms: float
    error: str | None
    response: str | None = Field(
        description="the start of the endpoint's answer; never shown to an admin limited to some"
        " cities or domains, for whom it would be a way to read what an internal service answers"
    )
    next_attempt_at: datetime | None = Field(description="when it was to be tried again, if it was")


class Delivery(BaseModel):
    id: int
    webhook_id: str
    message_id: str = Field(description="the `webhook-id` header, the same on every attempt")
    type: str
    state: DeliveryState
    created_at: datetime
    next_attempt_at: datetime | None = Field(description="for a pending delivery: its next try")
    attempt_count: int
    last_status: int | None
    last_error: str | None
    delivered_at: datetime | None
    failed_at: datetime | None
    failure_reason: str | None
    attempts: list[Attempt]


def _webhook(row: EndpointRow) -> Webhook:
    return Webhook(
        id=row.id,
        url=row.url,
        description=row.description,
        filter=row.filter,
        enabled=row.disabled_at is None,
        disabled_at=row.disabled_at,
        disabled_reason=row.disabled_reason,
        created_by=row.created_by,
        created_at=row.created_at,
    )


def _filter_detail(webhook_filter: WebhookFilter) -> dict[str, Any]:
    return webhook_filter.model_dump(mode="json", exclude_none=True)


def _delivery(row: DeliveryRow, principal: Principal) -> Delivery:
    # What an endpoint answered is shown only to admins of the whole system: the others could
    # register an internal address (one the allow-list opens) and read its answers back here.
    with_answers = principal.cities is None and principal.domains is None
    return Delivery(
        id=row.id,
        webhook_id=row.endpoint_id,
        message_id=row.message_id,
        type=row.event_type,
        state=row.state,  # type: ignore[arg-type]
        created_at=row.created_at,
        next_attempt_at=row.next_attempt_at if row.state == "pending" else None,
        attempt_count=row.attempts,
        last_status=row.last_status,
        last_error=row.last_error,
        delivered_at=row.delivered_at,
        failed_at=row.failed_at,
        failure_reason=row.failure_reason,
        attempts=[
            Attempt.model_validate(a, from_attributes=True).model_copy(
                update={} if with_answers else {"response": None}
            )
            for a in row.attempt_log
        ],
    )


async def _checked_url(settings: AppSettings, url: str) -> str:
    """The URL, once its shape and every address its host resolves to are acceptable."""
    try:
        target = parse_url(url)
        await allowed_addresses(target.host, target.port, policy_of(settings))
    except WebhookError as exc:
        raise HTTPException(400, f"webhook URL refused: {exc}") from exc
    return target.url


def _scoped_filter(principal: Principal, webhook_filter: WebhookFilter) -> WebhookFilter:
    """A scoped admin's endpoints default to its scope (checked by `_within_scope`)."""
    return webhook_filter.model_copy(
        update={
            "cities": webhook_filter.cities
            if webhook_filter.cities is not None or principal.cities is None
            else sorted(principal.cities),
            "domains": webhook_filter.domains
            if webhook_filter.domains is not None or principal.domains is None
            else sorted(principal.domains),
        }
    )


async def _within_scope(audit: AuditTrail, subject: Subject, webhook_filter: WebhookFilter) -> WebhookFilter:
    """The filter within the caller's scope; one reaching beyond it is refused (and recorded)."""
    scoped = _scoped_filter(audit.principal, webhook_filter)
    if not audit.principal.covers(scoped.cities, scoped.domains):
        raise await audit.refuse(
            Subject(subject.action, WEBHOOK, subject.object_id, scoped.cities, scoped.domains),
            403,
            "a webhook cannot receive events beyond the scope of the key that makes it",
        )
    return scoped


async def _scoped_endpoint(audit: AuditTrail, webhook_id: str, action: str) -> EndpointRow:
    row = await audit.database.webhooks.get_endpoint(webhook_id)
    await audit.require_scope(_subject(action, row), what=f"webhook {webhook_id!r}")
    return row


def _subject(action: str, row: EndpointRow, changed: WebhookFilter | None = None) -> Subject:
    """An endpoint as an audit entry's object. A changed filter widens the entry's scope to both
    the old and the new, so an admin limited to either sees nothing of the other."""
    cities, domains = row.cities, row.domains
    if changed is not None:
        cities = None if cities is None or changed.cities is None else [*cities, *changed.cities]
        domains = None if domains is None or changed.domains is None else [*domains, *changed.domains]
    return Subject(action, WEBHOOK, row.id, cities, domains)


@router.post(
    "/v1/webhooks",
    response_model=NewWebhook,
    status_code=201,
    summary="Register an agency endpoint (admin); the signing secret is in this answer only.",
    description="Events matching the filter are POSTed as Standard Webhooks v1 (signed, retried"
    " with backoff under the same `webhook-id`). A URL whose host is or resolves to an address that"
    " is not globally routable (loopback, private, link-local, carrier-grade NAT, an IPv6 address"
    " carrying one of those) is refused (400) unless `IOC_WEBHOOK_ALLOWED_NETWORKS` lists it;"
    " cloud metadata addresses are refused always.",
    responses={400: PROBLEM, 403: PROBLEM},
)
async def create_webhook(
    database: Db, audit: Audit, settings: AppSettings, principal: Admin, body: WebhookIn
) -> NewWebhook:
    webhook_id = "wh_" + secrets.token_hex(8)
    webhook_filter = await _within_scope(
        audit, Subject(WEBHOOK_CREATE, WEBHOOK, webhook_id, None, None), body.filter
    )
    url = await _checked_url(settings, body.url)
    secret = new_secret()
    subject = Subject(WEBHOOK_CREATE, WEBHOOK, webhook_id, webhook_filter.cities, webhook_filter.domains)
    detail = {
        "url": redacted_url(url),
        "description": body.description,
        "filter": _filter_detail(webhook_filter),
    }
    async with audit.change(subject, **detail) as change:
        row = await database.webhooks.create_endpoint(
            endpoint_id=webhook_id,
            url=url,
            description=body.description,
            secret=secret,
            webhook_filter=webhook_filter,
            created_by=principal.name,
            within=change.transaction,
        )
    return NewWebhook(**_webhook(row).model_dump(), secret=secret)


@router.get(
    "/v1/webhooks",
    response_model=Page[Webhook],
    summary="Agency endpoints within the caller's scope, without their secrets (admin).",
    responses={400: PROBLEM},
)
async def list_webhooks(
    database: Db,
    principal: Admin,
    limit: Annotated[int, Query(ge=1, le=1000, description="page size")] = 100,
    cursor: Cursor = None,
) -> Page[Webhook]:
    cities, domains = principal.city_filter(None), principal.domain_filter(None)
    after = decode_text_cursor(cursor)
    return await paginate(
        lambda n: database.webhooks.list_endpoints(cities, domains, after=after, limit=n),
        limit,
        cursor_of=lambda row: row.id,
        item=_webhook,
    )


@router.get(
    "/v1/webhooks/{webhook_id}",
    response_model=Webhook,
    summary="One agency endpoint (admin).",
    responses={404: PROBLEM},
)
async def get_webhook(audit: Audit, principal: Admin, webhook_id: WebhookId) -> Webhook:
    return _webhook(await _scoped_endpoint(audit, webhook_id, WEBHOOK_READ))


@router.patch(
    "/v1/webhooks/{webhook_id}",
    response_model=Webhook,
    summary="Change an endpoint's URL, description or filter, or enable or disable it (admin).",
    responses={400: PROBLEM, 403: PROBLEM, 404: PROBLEM},
)
async def update_webhook(
    database: Db,
    audit: Audit,
    settings: AppSettings,
    principal: Admin,
    webhook_id: WebhookId,
    body: WebhookPatch,
) -> Webhook:
    current = await _scoped_endpoint(audit, webhook_id, WEBHOOK_UPDATE)
    webhook_filter = (
        await _within_scope(audit, _subject(WEBHOOK_UPDATE, current), body.filter)
        if body.filter is not None
        else None
    )
    url = await _checked_url(settings, body.url) if body.url is not None else None
    changes = body.model_dump(exclude_unset=True, mode="json")
    if url is not None:
        changes["url"] = redacted_url(url)
    if webhook_filter is not None:
        changes["filter"] = _filter_detail(webhook_filter)
    async with audit.change(_subject(WEBHOOK_UPDATE, current, webhook_filter), changes=changes) as change:
        row = await database.webhooks.update_endpoint(
            webhook_id,
            url=url,
            description=body.description,
            webhook_filter=webhook_filter,
            enabled=body.enabled,
            within=change.transaction,
        )
    return _webhook(row)


@router.delete(
    "/v1/webhooks/{webhook_id}",
    status_code=204,
    summary="Remove an agency endpoint and its delivery log (admin).",
    responses={404: PROBLEM},
)
async def delete_webhook(database: Db, audit: Audit, principal: Admin, webhook_id: WebhookId) -> None:
    current = await _scoped_endpoint(audit, webhook_id, WEBHOOK_DELETE)
    async with audit.change(_subject(WEBHOOK_DELETE, current), url=redacted_url(current.url)) as change:
        await database.webhooks.delete_endpoint(webhook_id, within=change.transaction)


@router.get(
    "/v1/webhooks/{webhook_id}/deliveries",
    response_model=Page[Delivery],
    summary="The endpoint's deliveries, newest first, each with every attempt (admin).",
    responses={400: PROBLEM, 404: PROBLEM},
)
async def list_deliveries(
    database: Db,
    audit: Audit,
    principal: Admin,
    webhook_id: WebhookId,
    state: Annotated[
        str | None, Query(max_length=100, description="comma-separated: pending, delivered, failed")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500, description="page size")] = 50,
    cursor: Cursor = None,
) -> Page[Delivery]:
    await _scoped_endpoint(audit, webhook_id, WEBHOOK_READ)
    states = comma_list(state, DELIVERY_STATES, "state")
    before = decode_int_cursor(cursor)
    return await paginate(
        lambda n: database.webhooks.list_deliveries(webhook_id, states=states, before=before, limit=n),
        limit,
        cursor_of=lambda row: row.id,
        item=lambda row: _delivery(row, principal),
    )


@router.get(
    "/v1/webhooks/{webhook_id}/deliveries/{delivery_id}",
    response_model=Delivery,
    summary="One delivery with every attempt (admin).",
    responses={404: PROBLEM},
)
async def get_delivery(
    database: Db, audit: Audit, principal: Admin, webhook_id: WebhookId, delivery_id: DeliveryId
) -> Delivery:
    await _scoped_endpoint(audit, webhook_id, WEBHOOK_READ)
    return _delivery(await database.webhooks.get_delivery(webhook_id, delivery_id), principal)


@router.post(
    "/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/retry",
    response_model=Delivery,
    status_code=202,
    summary="Send a failed delivery again now, with a fresh retry window (admin).",
    description="The same `webhook-id` is sent again, so a receiver that did get it can tell."
    " A delivered one is a 409; a disabled endpoint must be enabled first (409).",
    responses={404: PROBLEM, 409: PROBLEM},
)
async def retry_delivery(
    database: Db, audit: Audit, principal: Admin, webhook_id: WebhookId, delivery_id: DeliveryId
) -> Delivery:
    endpoint = await _scoped_endpoint(audit, webhook_id, WEBHOOK_DELIVERY_RETRY)
    store = database.webhooks
    current = await store.get_delivery(webhook_id, delivery_id)
    if current.state == "delivered":
        raise ConflictError(f"delivery {delivery_id} was delivered already")
    if endpoint.disabled_at is not None:
        raise ConflictError(
            f"webhook {webhook_id!r} is disabled ({endpoint.disabled_reason}); enable it first"
        )
    async with audit.change(_subject(WEBHOOK_DELIVERY_RETRY, endpoint), delivery_id=delivery_id) as change:
        return _delivery(
            await store.retry_delivery(webhook_id, delivery_id, within=change.transaction), principal
        )
