"""The HTTP edge (aiohttp, on the same event loop as gRPC).

- Segment's HTTP Tracking API: POST /v1/{track,identify,page,alias,group,batch},
  write key as the Basic-auth user name (or a bearer key), Segment's limits.
- POST /v1/webhooks/{source}: Segment-shaped events from platforms that sign
  the body with a shared secret instead of sending a key.
- GET /v1/profiles/{user_id} (and ?anonymous_id=): the derived profile, in
  the JSON shape `sendtime profile --json` prints (see profile_json).
- GET /v1/content/{user_id}: send-time content for ESPs that can only call
  HTTP (Braze Connected Content, Iterable data feeds, Customer.io): blocks
  and/or a rendered template, within the caller's deadline header.
- POST /v1/catalog/products: upsert products (admin scope).
- GET and POST /v1/unsubscribe/{token}: RFC 8058 one-click unsubscribe (the
  POST mailbox providers make) and a confirmation page for people.
- GET and POST /v1/preferences/{token}: the email preferences page (each
  subscription group on or off), linked from every email.
- POST /v1/feedback/sendgrid, /v1/feedback/postmark: ESP bounce and complaint
  webhooks into the suppression list.
- GET /demo/images/{name}: the demo catalog's pictures (read once at start;
  no other file can be named), so that emails rendered from it show them.
- GET /healthz (alive) and /readyz (serving).
- GET /metrics: Prometheus metrics (metrics.enabled; the admin scope when
  metrics.require_admin_key).
- GET /: the live status page (admin scope; see status_page).

Errors go through http_errors; every JSON error names the field at fault.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import re
import ssl
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import msgspec
from aiohttp import web
from aiohttp.typedefs import Middleware

from sendtime.server.auth import Authenticator
from sendtime.server.deliveries import Suppressions
from sendtime.server.domain.catalog import CatalogUpdater
from sendtime.server.domain.content import ContentContext, ContentPipeline
from sendtime.server.domain.errors import (
    InvalidInput,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    SendtimeError,
    Unauthenticated,
    Unavailable,
)
from sendtime.server.domain.events import MAX_EVENT_BYTES, EventKind, Identity, IncomingEvent
from sendtime.server.domain.ingest import Ack, Ingestor, Outcome, Undecodable, utc_now
from sendtime.server.domain.queries import ProfileQueries
from sendtime.server.edge import preferences_page, segment
from sendtime.server.edge.http_errors import error_body, error_response
from sendtime.server.edge.http_keys import header_key, names_a_key
from sendtime.server.edge.http_limits import ConnectionLimiter, IngestAdmission, arrived, read_body
from sendtime.server.edge.http_observe import observe_middleware
from sendtime.server.edge.profile_json import profile_json
from sendtime.server.edge.status_page import StatusPage
from sendtime.server.feedback import PostmarkFeedback, SendGridFeedback
from sendtime.server.observe import Telemetry
from sendtime.server.preferences import Preferences
from sendtime.server.settings import HttpSettings, Scope, WebhookSource

SIGNATURE_HEADER: Final = "Sendtime-Signature"
#: The caller's time budget in milliseconds (ESPs' HTTP calls carry no deadline).
DEADLINE_HEADERS: Final = ("Sendtime-Deadline-Ms", "X-Sendtime-Deadline-Ms")
MAX_CATALOG_BYTES: Final = 8 * 1024 * 1024
_SINGLE_ROUTES: Final = ("track", "identify", "page", "alias", "group")
_json = msgspec.json.Encoder()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Image files the demo images route serves, by suffix; names are lower case,
#: so that the one URL a catalog holds is the only one that answers.
_IMAGE_TYPES: Final = {".png": "image/png", ".jpg": "image/jpeg", ".gif": "image/gif", ".webp": "image/webp"}
_IMAGE_NAME: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,99}\.(?:png|jpg|gif|webp)")
#: A day: the files change only with a new release, and a mail client that
#: fetched one need not ask again for a while (the ETag answers when it does).
IMAGE_CACHE_CONTROL: Final = "public, max-age=86400"

AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
BODY_TIMEOUT_S = web.AppKey("body_timeout_s", float)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except SendtimeError as error:
        response = error_response(error)
        if request.content.exception() is not None:
            # the body could not be read to its end: the connection cannot carry another request
            response.force_close()
        return response
    except web.HTTPRequestEntityTooLarge as exc:
        return error_response(PayloadTooLarge(f"the body is larger than {exc.text or 'allowed'}"))


def _json_response(body: object, status: int = 200) -> web.Response:
    return web.Response(body=_json.encode(body), status=status, content_type="application/json")


def _api_key(request: web.Request, body: bytes | None = None) -> str | None:
    """The Authorization header's key (edge.http_keys), else Segment's write key in the body."""
    if names_a_key(request.headers) or not body:
        return header_key(request.headers)
    try:
        return segment.write_key_in_body(body)
    except UnicodeDecodeError:
        raise InvalidInput.field("body", "is not valid UTF-8") from None


def _header_key(request: web.Request) -> str | None:
    """The key in the Authorization header alone (none: maybe one in the body)."""
    return _api_key(request) if "Authorization" in request.headers else None


async def _read(request: web.Request, limit: int) -> bytes:
    """The request's body, decoded from its Content-Encoding, at most ``limit``
    bytes before and after decoding (read_body bounds its time and size)."""
    coding = request.headers.get("Content-Encoding", "").strip().lower()
    if coding not in _BODY_CODINGS:
        raise InvalidInput.field(
            "Content-Encoding", f"is {coding!r}; the body may be gzip, deflate or not encoded (identity)"
        )
    body = await read_body(request, limit, request.app[BODY_TIMEOUT_S])
    if _BODY_CODINGS[coding]:
        body = _decompressed(body, coding, limit)
    return body


#: Content codings taken, each with its zlib window bits (0: not compressed).
#: The server decodes them here, not aiohttp (auto_decompress is off): aiohttp
#: answers a broken body in plain text from its parser, passes codings it does
#: not know (x-gzip, compress) through as if plain, and would inflate a body to
#: its 8 MB buffer limit whatever the route's own limit.
_BODY_CODINGS: Final = {"": 0, "identity": 0, "gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def _decompressed(body: bytes, coding: str, limit: int) -> bytes:
    wbits = _BODY_CODINGS[coding]
    if coding == "deflate" and not (body[:1] and body[0] & 0x0F == 8):
        wbits = -zlib.MAX_WBITS  # raw deflate, without the zlib header: some clients send it
    decompressor = zlib.decompressobj(wbits)
    try:
        decoded = decompressor.decompress(
            body, limit + 1
        )  # no further: a small body may inflate to gigabytes
    except zlib.error as exc:
        raise InvalidInput.field(
            "Content-Encoding", f"is {coding}, but the body is not {coding} data: {exc}"
        ) from None
    if len(decoded) > limit:
        raise PayloadTooLarge(f"the body decompresses to more than {limit} bytes, the limit")
    if not decompressor.eof:
        raise InvalidInput.field(
            "Content-Encoding", f"is {coding}, but the body ends inside the {coding} data"
        )
    if decompressor.unused_data:
        raise InvalidInput.field(
            "Content-Encoding", f"is {coding}, but the body goes on after the {coding} data"
        )
    return decoded


@dataclass(kw_only=True)
class _IngestRoutes:
    """Events in: Segment's single and batch calls, and signed webhooks."""

    ingestor: Ingestor
    authenticator: Authenticator
    webhooks: dict[str, WebhookSource]
    clock: Callable[[], datetime] = utc_now

    async def single(self, request: web.Request) -> web.Response:
        route = request.match_info["kind"]
        body = await _read(request, MAX_EVENT_BYTES)
        self.authenticator.authorize(_api_key(request, body), Scope.INGEST)
        incoming = segment.decode_single(body, route, self.clock())
        (ack,) = await self.ingestor.ingest([incoming])
        if ack.error is not None:
            raise InvalidInput(
                ack.error.message,
                segment.rename_violations(ack.error.violations, _kind(incoming)),
                reason=ack.error.reason,
            )
        return _json_response({"success": True, "messageId": ack.message_id, "outcome": ack.outcome.value})

    async def batch(self, request: web.Request) -> web.Response:
        body = await _read(request, segment.MAX_BATCH_BYTES)
        self.authenticator.authorize(_api_key(request, body), Scope.INGEST)
        return await self._ingest_batch(segment.decode_batch(body, self.clock()))

    async def webhook(self, request: web.Request) -> web.Response:
        source = self.webhooks.get(request.match_info["source"])
        if source is None:
            raise Unauthenticated(f"no webhook source is named {request.match_info['source']!r}")
        # The header's shape and age are checked before a byte of the body is read.
        signature = _signature(source, request.headers.get(SIGNATURE_HEADER), time.time())
        body = await _read(request, segment.MAX_BATCH_BYTES)
        signature.verify(body)
        return await self._ingest_batch(segment.decode_webhook(body, self.clock()))

    async def _ingest_batch(self, incoming: Sequence[IncomingEvent | Undecodable]) -> web.Response:
        acks = await self.ingestor.ingest(incoming)
        results = [_result(ack, incoming[ack.index]) for ack in acks]
        rejected = sum(1 for ack in acks if ack.outcome is Outcome.REJECTED)
        if not rejected:
            return _json_response({"success": True, "results": results})
        message = (
            f"all {rejected} events were rejected"
            if rejected == len(acks)
            else f"{rejected} of {len(acks)} events were rejected; the others were stored"
        )
        error = InvalidInput(message, reason="INVALID_EVENTS")
        return _json_response({**error_body(error), "results": results}, status=400)


@dataclass(kw_only=True)
class _DataRoutes:
    """Profiles and content out, catalog updates in."""

    authenticator: Authenticator
    queries: ProfileQueries
    pipeline: ContentPipeline
    catalog: CatalogUpdater
    default_deadline_s: float

    async def profile(self, request: web.Request) -> web.Response:
        self.authenticator.authorize(_api_key(request), Scope.CONTENT)
        user_id = request.match_info.get("user_id", "")
        view = await self.queries.get(user_id=user_id, anonymous_id=request.query.get("anonymous_id", ""))
        return _json_response(profile_json(view))

    async def profile_by_anonymous_id(self, request: web.Request) -> web.Response:
        return await self.profile(request)

    async def content(self, request: web.Request) -> web.Response:
        self.authenticator.authorize(_api_key(request), Scope.CONTENT)
        query = request.query
        user_id = request.match_info["user_id"]
        identity = (
            Identity(anonymous_id=user_id) if query.get("anonymous") in ("1", "true") else Identity(user_id)
        )
        context = ContentContext(
            campaign=query.get("campaign", ""),
            locale=query.get("locale", ""),
            cart_id=query.get("cart_id", ""),
        )
        budget = self._budget(request)
        # The deadline runs from when the request came, not from its handler's
        # start: under load it waits a loop iteration or more for the handler,
        # and what is left decides whether the call can be answered in time.
        came = arrived(request)
        left = max(budget - (time.monotonic() - came), 0.0) if came is not None else budget
        template_id = query.get("template", "")
        body: dict[str, Any] = {"user_id": user_id}
        if template_id:
            try:
                rendered = await self.pipeline.email(template_id, identity, context, left)
            except Overloaded:
                # a refusal that could only leave after the caller's deadline
                # (it waited that long for its handler) is a late answer too
                if came is not None:
                    self.pipeline.left("email", came + budget)
                raise
            blocks = rendered.blocks
            email = rendered.email
            body["email"] = {
                "template_id": email.template_id,
                "template_version": email.version,
                "subject": email.subject,
                "preheader": email.preheader,
                "html": email.html,
                "text": email.text,
            }
            elapsed, deadline, call = rendered.elapsed_s, rendered.deadline, "email"
        else:
            names = [n for n in query.get("blocks", "").split(",") if n.strip()]
            answer = await self.pipeline.content(identity, [n.strip() for n in names], context, left)
            blocks, elapsed = answer.blocks, answer.elapsed_s
            deadline, call = answer.deadline, "content"
        body["blocks"] = {
            b.name: {
                "data": b.data,
                "source": b.source.value,
                "reason": b.reason.value if b.reason else None,
                "age_ms": round(b.age_s * 1000, 1),
                "detail": b.detail,
            }
            for b in blocks
        }
        body["server_time_ms"] = round(elapsed * 1000, 2)
        body["budget_ms"] = round(budget * 1000, 1)
        response = _json_response(body)
        self.pipeline.left(call, deadline)
        return response

    def _budget(self, request: web.Request) -> float:
        for header in DEADLINE_HEADERS:
            raw = request.headers.get(header)
            if raw is None:
                continue
            try:
                milliseconds = float(raw)
            except ValueError:
                raise InvalidInput.field(header, "must be a number of milliseconds") from None
            if not 0 < milliseconds <= 60_000:
                raise InvalidInput.field(header, "must be between 0 and 60000 milliseconds")
            return milliseconds / 1000
        return self.default_deadline_s

    async def upsert_products(self, request: web.Request) -> web.Response:
        self.authenticator.authorize(_api_key(request), Scope.ADMIN)
        count = await self.catalog.upsert(await _read(request, MAX_CATALOG_BYTES))
        return _json_response({"success": True, "upserted": count})


@dataclass(kw_only=True)
class _RecipientRoutes:
    """What recipients and their ESPs tell: unsubscribes, preferences, bounces and complaints."""

    suppressions: Suppressions
    sendgrid: SendGridFeedback | None
    postmark: PostmarkFeedback | None
    preferences: Preferences | None = None

    async def unsubscribe_page(self, request: web.Request) -> web.Response:
        """The link a person clicks: says what it will do, and asks to confirm
        (a GET must not unsubscribe: link scanners follow every link)."""
        token = request.match_info["token"]
        try:
            what = self.suppressions.check(token)
        except SendtimeError as error:
            return _page(error_response(error).status, "This link does not work", error.message)
        return _page(
            200,
            "Unsubscribe?",
            f"You will get no more {what.group} emails from us.",
            form_action=f"/v1/unsubscribe/{token}",
        )

    async def unsubscribe(self, request: web.Request) -> web.Response:
        """RFC 8058: mailbox providers POST "List-Unsubscribe=One-Click"; the
        confirmation page POSTs its form. Both unsubscribe at once."""
        body = await _read(request, 4096)
        one_click = b"List-Unsubscribe=One-Click" in body
        try:
            what = await self.suppressions.unsubscribe(
                request.match_info["token"], source="one-click" if one_click else "page"
            )
        except SendtimeError as error:
            if one_click:
                raise
            return _page(error_response(error).status, "This link does not work", error.message)
        if one_click:
            return _json_response({"success": True})
        return _page(200, "You are unsubscribed", f"You will get no more {what.group} emails from us.")

    async def preferences_page(self, request: web.Request) -> web.Response:
        """The page every email links: the recipient's subscription groups,
        each on or off. A GET changes nothing."""
        return await self._preferences(request, None)

    async def update_preferences(self, request: web.Request) -> web.Response:
        """The page's form: turns groups on and off, durably, then shows them."""
        return await self._preferences(request, await _read(request, preferences_page.MAX_FORM_BYTES))

    async def _preferences(self, request: web.Request, form: bytes | None) -> web.Response:
        if self.preferences is None:
            raise NotFound("the preferences page is not set up")
        token = request.match_info["token"]
        as_json = preferences_page.wants_json(request)
        try:
            if form is None:
                view = await self.preferences.show(token)
            else:
                view = await self.preferences.update(token, preferences_page.wanted_groups(form))
        except SendtimeError as error:
            if as_json:
                raise
            return _page(error_response(error).status, "This link does not work", error.message)
        saved = form is not None
        if as_json:
            return _json_response(preferences_page.as_json(view, saved=saved))
        return preferences_page.page(view, f"/v1/preferences/{token}", saved=saved)

    async def sendgrid_feedback(self, request: web.Request) -> web.Response:
        if self.sendgrid is None:
            raise NotFound("the SendGrid feedback webhook is not configured")
        signature = request.headers.get("X-Twilio-Email-Event-Webhook-Signature")
        timestamp = request.headers.get("X-Twilio-Email-Event-Webhook-Timestamp")
        self.sendgrid.check_headers(signature, timestamp)  # before the body is read
        body = await _read(request, MAX_CATALOG_BYTES)
        self.sendgrid.verify(body, signature, timestamp)
        added = await self.suppressions.from_feedback(self.sendgrid.suppressions(body))
        return _json_response({"success": True, "suppressed": added})

    async def postmark_feedback(self, request: web.Request) -> web.Response:
        if self.postmark is None:
            raise NotFound("the Postmark feedback webhook is not configured")
        self.postmark.verify(request.headers.get("Authorization"))
        body = await _read(request, segment.MAX_BATCH_BYTES)
        added = await self.suppressions.from_feedback(self.postmark.suppressions(body))
        return _json_response({"success": True, "suppressed": added})


@dataclass(kw_only=True)
class _OpsRoutes:
    """Health, readiness, metrics and the demo's pictures."""

    authenticator: Authenticator
    ready: Callable[[], bool]
    telemetry: Telemetry
    images: Mapping[str, StaticFile] = field(default_factory=dict)

    async def demo_image(self, request: web.Request) -> web.Response:
        """A picture from memory, by its exact name: nothing the request says is
        looked up on disk, so no name (``..``, an encoded slash) reaches
        another file. Public: a mail client fetches it with no key."""
        name = request.match_info["name"]
        image = self.images.get(name)
        if image is None:
            raise NotFound(f"no demo image is named {name!r}")
        headers = {"Cache-Control": IMAGE_CACHE_CONTROL, "ETag": image.etag}
        if _etag_matches(request.headers.get("If-None-Match", ""), image.etag):
            return web.Response(status=304, headers=headers)
        return web.Response(body=image.body, content_type=image.content_type, headers=headers)

    async def healthz(self, _request: web.Request) -> web.Response:
        return _json_response({"status": "alive"})

    async def readyz(self, _request: web.Request) -> web.Response:
        if not self.ready():
            raise Unavailable("not serving")
        return _json_response({"status": "serving"})

    async def metrics(self, request: web.Request) -> web.Response:
        metrics = self.telemetry.metrics
        assert metrics is not None  # the route exists only with metrics on
        if self.telemetry.metrics_need_key:
            self.authenticator.authorize(_api_key(request), Scope.ADMIN)
        body, content_type = metrics.render(request.headers.get("Accept"))
        return web.Response(body=body, headers={"Content-Type": content_type})


@dataclass(frozen=True, slots=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str


def load_images(folder: Path) -> dict[str, StaticFile]:
    """The image files directly in ``folder`` whose names the route can serve
    (lower-case letters, digits, ``-`` and ``_``, a known image suffix), read
    once; none when the folder is missing (a broken install: no pictures,
    nothing else wrong)."""
    if not folder.is_dir():
        return {}
    images = {}
    for path in sorted(folder.iterdir()):
        if _IMAGE_NAME.fullmatch(path.name) and path.is_file() and not path.is_symlink():
            body = path.read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
            images[path.name] = StaticFile(body, _IMAGE_TYPES[path.suffix], etag)
    return images


def _etag_matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110's weak comparison of an If-None-Match list (or ``*``) with ``etag``."""
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


def _page(status: int, title: str, message: str, *, form_action: str = "") -> web.Response:
    form = (
        f'<form method="post" action="{html.escape(form_action)}"><button type="submit">Unsubscribe</button></form>'
        if form_action
        else ""
    )
    body = (
        "<!doctype html><html lang=en><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>{html.escape(title)}</title>"
        '<body style="font-family:system-ui,sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem">'
        f"<h1>{html.escape(title)}</h1><p>{html.escape(message)}</p>{form}</body></html>"
    )
    return web.Response(status=status, text=body, content_type="text/html")


def _kind(incoming: IncomingEvent | Undecodable) -> EventKind | None:
    return incoming.kind if isinstance(incoming, IncomingEvent) else None


def _result(ack: Ack, incoming: IncomingEvent | Undecodable) -> dict[str, object]:
    result: dict[str, object] = {
        "index": ack.index,
        "messageId": ack.message_id,
        "outcome": ack.outcome.value,
    }
    if ack.error is not None:
        result["message"] = ack.error.message
        result["fieldViolations"] = [
            {"field": v.field, "description": v.description}
            for v in segment.rename_violations(ack.error.violations, _kind(incoming))
        ]
    return result


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The signature header value a webhook sender puts on ``body``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


@dataclass(frozen=True, slots=True)
class _Signature:
    source: WebhookSource
    timestamp: int
    given: str

    def verify(self, body: bytes) -> None:
        expected = sign(self.source.secret, body, self.timestamp).partition(",v1=")[2]
        if not hmac.compare_digest(expected, self.given):
            raise Unauthenticated("the webhook signature does not match the body")


#: Unix seconds have 10 digits until the year 2286: a longer t= is no timestamp.
_MAX_TIMESTAMP_DIGITS: Final = 12


def _signature(source: WebhookSource, header: str | None, now: float) -> _Signature:
    """The signature header, parsed and its age checked (the body comes later)."""
    if not header:
        raise Unauthenticated(f"the {SIGNATURE_HEADER} header is required")
    parts = dict(part.strip().partition("=")[::2] for part in header.split(","))
    raw_timestamp = parts.get("t", "")
    given = parts.get("v1", "")
    if not (raw_timestamp.isascii() and raw_timestamp.isdigit()) or not given:
        raise Unauthenticated(f"the {SIGNATURE_HEADER} header must be t=UNIX_SECONDS,v1=HEX")
    if len(raw_timestamp) > _MAX_TIMESTAMP_DIGITS:
        raise Unauthenticated(
            f"the signature's timestamp t= has {len(raw_timestamp)} digits: not Unix seconds"
        )
    timestamp = int(raw_timestamp)
    if abs(now - timestamp) > source.tolerance_s:
        raise Unauthenticated(
            f"the signature's timestamp is {abs(now - timestamp):.0f} s away from now;"
            f" the tolerance is {source.tolerance_s:.0f} s"
        )
    return _Signature(source, timestamp, given)


class _LimitedSite(web.BaseSite):
    """aiohttp's TCPSite, with each connection counted by a ConnectionLimiter."""

    __slots__ = ("_host", "_limiter", "_port", "_reuse_port")

    def __init__(
        self,
        runner: web.AppRunner,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        limiter: ConnectionLimiter,
        reuse_port: bool,
    ) -> None:
        # The kernel's queue of connections not accepted yet: as deep as the
        # connections this edge keeps. At aiohttp's 128, a burst of clients
        # connecting at once overflows it while the loop is busy, and every
        # connection past it (a health check's too) waits out a SYN
        # retransmission, a second or more, before it is even seen.
        super().__init__(runner, ssl_context=ssl_context, backlog=max(128, limiter.max_connections))
        self._host = host
        self._port = port
        self._limiter = limiter
        #: SO_REUSEPORT: only for the workers of `serve --workers`, which share the port
        self._reuse_port = reuse_port

    @property
    def name(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self._limiter.protocol_factory(server),
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_port=self._reuse_port,
        )


@dataclass
class HttpEdge:
    runner: web.AppRunner
    settings: HttpSettings
    ssl_context: ssl.SSLContext | None
    limiter: ConnectionLimiter
    port: int = 0

    async def start(self) -> None:
        await self.runner.setup()
        site = _LimitedSite(
            self.runner,
            self.settings.host,
            self.settings.port,
            ssl_context=self.ssl_context,
            limiter=self.limiter,
            reuse_port=self.settings.reuse_port,
        )
        try:
            await site.start()
        except OSError as exc:
            await self.runner.cleanup()
            raise Unavailable(
                f"cannot listen for HTTP on {self.settings.host}:{self.settings.port}: {exc}"
            ) from None
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        await self.runner.cleanup()


def build_http_edge(
    settings: HttpSettings,
    *,
    ingestor: Ingestor,
    queries: ProfileQueries,
    authenticator: Authenticator,
    webhooks: Sequence[WebhookSource],
    pipeline: ContentPipeline,
    catalog: CatalogUpdater,
    default_deadline_s: float,
    suppressions: Suppressions,
    sendgrid: SendGridFeedback | None,
    postmark: PostmarkFeedback | None,
    ready: Callable[[], bool],
    shutdown_grace_s: float,
    telemetry: Telemetry,
    clock: Callable[[], datetime] = utc_now,
    status_page: StatusPage | None = None,
    ingest_backlogged: Callable[[], bool] = lambda: False,
    preferences: Preferences | None = None,
    demo_images: Path | None = None,
) -> HttpEdge:
    ingest = _IngestRoutes(
        ingestor=ingestor, authenticator=authenticator, webhooks={w.name: w for w in webhooks}, clock=clock
    )
    data = _DataRoutes(
        authenticator=authenticator,
        queries=queries,
        pipeline=pipeline,
        catalog=catalog,
        default_deadline_s=default_deadline_s,
    )
    recipients = _RecipientRoutes(
        suppressions=suppressions, sendgrid=sendgrid, postmark=postmark, preferences=preferences
    )
    ops = _OpsRoutes(
        authenticator=authenticator,
        ready=ready,
        telemetry=telemetry,
        images=load_images(demo_images) if demo_images is not None else {},
    )
    limiter = ConnectionLimiter(settings.max_connections)
    middlewares: list[Middleware] = [limiter.middleware, _errors]
    if telemetry.records_requests():
        # outermost: it sees the status _errors answered with
        middlewares.insert(0, observe_middleware(telemetry))
    # The route handlers read bodies with their exact per-route limits, as the
    # bytes come (read_body); this only caps what aiohttp itself would buffer.
    app = web.Application(middlewares=middlewares, client_max_size=MAX_CATALOG_BYTES + 1024)
    app[BODY_TIMEOUT_S] = settings.body_timeout_s
    admission = IngestAdmission(settings.max_ingest_bytes_in_flight, ingest_backlogged)

    def ingest_key(request: web.Request) -> None:
        key = _header_key(request)
        if key is not None:
            authenticator.authorize(key, Scope.INGEST)

    def no_key(_request: web.Request) -> None:
        """Webhooks are signed instead; the route checks the signature header first."""

    batch = admission.wrap(ingest.batch, ingest_key, segment.MAX_BATCH_BYTES)
    app.router.add_post("/v1/batch", batch)
    app.router.add_post("/v1/import", batch)  # Segment's older name for batch
    app.router.add_post(
        r"/v1/{kind:(" + "|".join(_SINGLE_ROUTES) + ")}",
        admission.wrap(ingest.single, ingest_key, MAX_EVENT_BYTES),
    )
    app.router.add_post(
        "/v1/webhooks/{source}", admission.wrap(ingest.webhook, no_key, segment.MAX_BATCH_BYTES)
    )
    app.router.add_get("/v1/profiles", data.profile_by_anonymous_id)
    app.router.add_get("/v1/profiles/{user_id}", data.profile)
    app.router.add_get("/v1/content/{user_id}", data.content)
    app.router.add_post("/v1/catalog/products", data.upsert_products)
    app.router.add_get("/v1/unsubscribe/{token}", recipients.unsubscribe_page)
    app.router.add_post("/v1/unsubscribe/{token}", recipients.unsubscribe)
    app.router.add_get("/v1/preferences/{token}", recipients.preferences_page)
    app.router.add_post("/v1/preferences/{token}", recipients.update_preferences)
    app.router.add_post("/v1/feedback/sendgrid", recipients.sendgrid_feedback)
    app.router.add_post("/v1/feedback/postmark", recipients.postmark_feedback)
    app.router.add_get("/demo/images/{name}", ops.demo_image)
    app.router.add_get("/healthz", ops.healthz)
    app.router.add_get("/readyz", ops.readyz)
    if telemetry.metrics is not None:
        app.router.add_get("/metrics", ops.metrics)
    if status_page is not None:
        status_page.register(app)  # GET / and GET /v1/deliveries/{id}/preview (admin)
    ssl_context = None
    if settings.tls is not None:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(settings.tls.cert_file, settings.tls.key_file)
    # aiohttp's keep-alive timer runs from the connection's start and from each
    # answer until a complete request head has arrived: the header timeout.
    # auto_decompress off: _read decodes Content-Encoding itself (see _BODY_CODINGS).
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=shutdown_grace_s,
        keepalive_timeout=settings.header_timeout_s,
        auto_decompress=False,
    )
    return HttpEdge(runner=runner, settings=settings, ssl_context=ssl_context, limiter=limiter)
