"""The delivery API's use cases: send now, read the ledger, summarise flows.

A send asked for through the API is scheduled like a flow's, due now, under
``send_key("api", ...)`` of the caller's idempotency key: asking twice returns
the first delivery, whatever happened to it since.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from sendtime.server.domain.errors import InvalidInput, NotFound
from sendtime.server.domain.events import MAX_ID_CHARS, Identity
from sendtime.server.domain.flows import Flow, PlannedSend, send_key
from sendtime.server.domain.ingest import utc_now
from sendtime.server.domain.ports import DeliveryLedger, SuppressionList
from sendtime.server.domain.sends import SendRecord
from sendtime.server.domain.unsubscribe import Unsubscribe, UnsubscribeTokens
from sendtime.server.feedback import Suppression, dedupe

log = logging.getLogger(__name__)

API_FLOW: Final = ""
MAX_PAGE: Final = 500
#: Delivery ids are 64-bit integers (SQLite's): a larger number names none.
MAX_ID: Final = 2**63
DEFAULT_PAGE: Final = 50


@dataclass(frozen=True, slots=True)
class FlowCounts:
    flow: Flow
    counts: dict[str, int]


class Deliveries:
    def __init__(
        self,
        ledger: DeliveryLedger,
        flows: Sequence[Flow],
        templates: Callable[[str], object],
        wake_dispatcher: Callable[[datetime], None],
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._ledger = ledger
        self._wake_dispatcher = wake_dispatcher
        self._flows = tuple(flows)
        self._check_template = templates
        self._clock = clock

    async def send_now(
        self,
        *,
        template_id: str,
        identity: Identity,
        idempotency_key: str,
        transactional: bool,
        subscription_group: str,
    ) -> SendRecord:
        if not template_id:
            raise InvalidInput.field("template_id", "is required")
        if not idempotency_key:
            raise InvalidInput.field("idempotency_key", "is required: the same key is the same send")
        if len(idempotency_key) > 100:
            raise InvalidInput.field("idempotency_key", "is longer than 100 characters")
        _check_identity(identity)
        self._check_template(template_id)  # NotFound or TemplateError now, not at send time
        group = "" if transactional else (subscription_group or "marketing")
        now = self._clock()
        planned = PlannedSend(
            send_key=send_key("api", 1, "", idempotency_key),
            flow_id=API_FLOW,
            template_id=template_id,
            profile_key=identity.key,
            user_id=identity.user_id,
            anonymous_id=identity.anonymous_id,
            entry_key=idempotency_key,
            entry_message_id="",
            entry_time=now,
            received_at=now,
            due_at=now,
            subscription_group=group,
        )
        record = await self._ledger.schedule_send(planned)
        self._wake_dispatcher(planned.due_at)
        return record

    async def get(self, *, send_id: int = 0, idempotency_key: str = "") -> SendRecord:
        if bool(send_id) == bool(idempotency_key):
            raise InvalidInput.field("id", "give exactly one of id and idempotency_key")
        if send_id:
            record = await self._ledger.get_send(send_id=send_id)
        else:
            # an API key, or a flow send's own key as the ledger shows it
            record = await self._ledger.get_send(send_key=send_key("api", 1, "", idempotency_key))
            if record is None:
                record = await self._ledger.get_send(send_key=idempotency_key)
        if record is None:
            raise NotFound("no delivery has that id" if send_id else "no delivery has that idempotency key")
        return record

    async def list_deliveries(
        self, *, identity: Identity | None, flow_id: str, page_size: int, page_token: str
    ) -> tuple[list[SendRecord], str]:
        if page_size < 0 or page_size > MAX_PAGE:
            raise InvalidInput.field("page_size", f"must be between 0 and {MAX_PAGE}")
        size = page_size or DEFAULT_PAGE
        before = _decode_token(page_token) if page_token else None
        records = await self._ledger.list_sends(
            profile_key=identity.key if identity is not None else None,
            flow_id=flow_id or None,
            limit=size + 1,
            before_id=before,
        )
        more = len(records) > size
        records = records[:size]
        token = _encode_token(records[-1].id) if more and records else ""
        return records, token

    async def flows(self) -> list[FlowCounts]:
        counts = await self._ledger.flow_counts()
        return [FlowCounts(flow, counts.get(flow.id, {})) for flow in self._flows]


class FlowRecount:
    """The sends of every flow by status, counted over the whole ledger at most
    every ``max_age_s``, in the background: a status page draw reads the last
    count instead of running one (a count reads every send row: 70 ms at 60,000
    users, so a page asked for often made the ledger's reads wait). The ledger
    is counted, not a tally of this process's own changes: replicas on one
    database change it too."""

    def __init__(
        self, ledger: DeliveryLedger, *, max_age_s: float = 2.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ledger = ledger
        self._max_age_s = max_age_s
        self._clock = clock
        self._counts: dict[str, dict[str, int]] | None = None
        self._counted_at = 0.0
        self._counting: asyncio.Task[None] | None = None

    async def counts(self) -> tuple[dict[str, dict[str, int]], float]:
        """The last count and its age in seconds; the first call waits for one."""
        if self._counts is None or self._clock() - self._counted_at > self._max_age_s:
            if self._counting is None:
                self._counting = asyncio.create_task(self._recount(), name="sendtime-flow-recount")
            if self._counts is None:
                await self._counting
        assert self._counts is not None
        return self._counts, self._clock() - self._counted_at

    async def _recount(self) -> None:
        started = self._clock()
        try:
            self._counts = await self._ledger.flow_counts()
            self._counted_at = started
        except Exception:
            log.warning("counting the flows' sends failed", exc_info=True)
            if self._counts is None:
                raise
        finally:
            self._counting = None


class DeliveryQueries:
    """The ledger as the status page shows it."""

    def __init__(self, ledger: DeliveryLedger) -> None:
        self._ledger = ledger
        self._recount = FlowRecount(ledger)

    async def flow_counts(self) -> tuple[dict[str, dict[str, int]], float]:
        """Sends by flow id (every one in the ledger), then by status, and how
        many seconds ago they were counted (see FlowRecount)."""
        return await self._recount.counts()

    async def latest(self, limit: int) -> list[SendRecord]:
        return await self._ledger.list_sends(limit=limit)

    async def find(self, send_id: int) -> SendRecord | None:
        return await self._ledger.get_send(send_id=send_id) if send_id > 0 else None


def _check_identity(identity: Identity) -> None:
    Identity.exactly_one(identity.user_id, identity.anonymous_id)
    if len(identity.user_id or identity.anonymous_id) > MAX_ID_CHARS:
        raise InvalidInput.field("user_id", f"is longer than {MAX_ID_CHARS} characters")


def _encode_token(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"before:{last_id}".encode()).decode()


def _decode_token(token: str) -> int:
    try:
        kind, _, value = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        if kind != "before":
            raise ValueError(kind)
        last_id = int(value)
        if not 0 < last_id < MAX_ID:  # the store's ids are 64-bit integers
            raise ValueError(value)
        return last_id
    except ValueError:
        raise InvalidInput.field("page_token", "is not a token from a previous page") from None


class Suppressions:
    """One-click unsubscribes and ESP feedback, into the suppression list."""

    def __init__(
        self,
        suppressions: SuppressionList,
        tokens: UnsubscribeTokens,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._suppressions = suppressions
        self._tokens = tokens
        self._clock = clock

    def check(self, token: str) -> Unsubscribe:
        """What the token unsubscribes; refuses forged, altered or expired ones."""
        return self._tokens.verify(token, self._clock())

    async def unsubscribe(self, token: str, *, source: str) -> Unsubscribe:
        request = self.check(token)
        await self._suppressions.suppress(request.profile_key, request.group, "unsubscribed", source)
        return request

    async def from_feedback(self, suppressions: Sequence[Suppression]) -> int:
        """Suppress each reported address; returns how many were new."""
        added = 0
        for item in dedupe(suppressions):
            added += await self._suppressions.suppress(item.subject, item.group, item.reason, item.source)
        return added
