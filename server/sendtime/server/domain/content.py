"""Send-time content under a deadline: one pipeline for GetContent, the HTTP
content endpoint and whole-email renders.

The caller's time budget is split: a reserve for rendering and answering, the
rest for fetching. Every block is fetched in parallel through the block cache
(single flight, stale-while-revalidate, negative caching, circuit breakers),
each bounded by the time left. A block that misses the budget is served stale
when a stale value exists, else its fallback, and says which and why. The
render gets the reserve kept for it: a render in a worker process (which may
be behind, stuck or dead) is waited for only half the time left, then done in
place, which the render reserve covers. Nothing here can make the call fail or
run past its deadline: the worst answer is all fallbacks, at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from opentelemetry.trace import Tracer

from sendtime.server.domain import blocks as builtin
from sendtime.server.domain.blocks import BlockName
from sendtime.server.domain.catalog import Catalog
from sendtime.server.domain.errors import InvalidInput, Overloaded
from sendtime.server.domain.events import Identity
from sendtime.server.domain.profile import Profile, ProfileView, view
from sendtime.server.domain.profiles import ProfileBook
from sendtime.server.domain.provenance import Reason, Source
from sendtime.server.domain.recommend import Recommender

MAX_BLOCKS: Final = 20


@dataclass(frozen=True, slots=True)
class Block:
    name: str
    data: Any
    source: Source
    reason: Reason | None = None
    age_s: float = 0.0
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ContentContext:
    campaign: str = ""
    locale: str = ""
    cart_id: str = ""
    #: (name, url) links of this one email over the configured ones: a flow
    #: send's own signed unsubscribe URL, which only its recipient may use.
    links: tuple[tuple[str, str], ...] = ()


@dataclass(slots=True)
class ContentAnswer:
    blocks: list[Block]
    budget_s: float
    elapsed_s: float
    user: dict[str, Any] = field(default_factory=dict)
    #: When the caller's whole budget runs out (the pipeline's clock): an edge
    #: tells ContentPipeline.left when the answer goes, to count late ones.
    deadline: float = math.inf


@dataclass(slots=True)
class EmailAnswer:
    email: RenderedEmail
    #: The template's blocks as rendered: a block whose data the template could
    #: not render was replaced by its fallback and says so.
    blocks: list[Block]
    content: ContentAnswer
    elapsed_s: float
    deadline: float = math.inf


class Fetched(Protocol):
    """What the block cache answers for one key."""

    @property
    def value(self) -> Any: ...
    @property
    def source(self) -> Source: ...
    @property
    def reason(self) -> Reason | None: ...
    @property
    def age(self) -> float: ...
    @property
    def detail(self) -> str: ...


class BlockCache(Protocol):
    """Single flight, stale-while-revalidate, negative caching and breakers
    (adapter: sendtime.server.cache.CacheFetcher)."""

    def lookup_stale_ok(self, key: str) -> tuple[Any, float, bool] | None:
        """(value, age, fresh) without fetching, or None."""
        ...

    async def get_or_fetch(
        self,
        key: str,
        fetch: Callable[[], Awaitable[Any]],
        *,
        ttl: float,
        stale_ttl: float,
        # how long this call waits; the fetch itself may outlive it to fill the cache
        timeout: float | None,  # noqa: ASYNC109
        tags: Sequence[str],
        negative_ttl: float,
        breaker_key: str | None,
    ) -> Fetched: ...

    def invalidate_tag(self, tag: str) -> int: ...

    def fill_now(
        self,
        key: str,
        compute: Callable[[], Any],
        *,
        ttl: float,
        stale_ttl: float,
        tags: Sequence[str],
        negative_ttl: float,
    ) -> Fetched | None:
        """Compute and store a value that needs no I/O, with no task; None when
        a fetch for the key is under way or failed lately (then get_or_fetch)."""
        ...


class RenderedEmail(Protocol):
    @property
    def subject(self) -> str: ...
    @property
    def preheader(self) -> str: ...
    @property
    def html(self) -> str: ...
    @property
    def text(self) -> str: ...
    @property
    def template_id(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def fell_back(self) -> Sequence[str]: ...


class EmailTemplate(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def blocks(self) -> Mapping[str, Any]: ...

    def render(self, context: Mapping[str, Any]) -> RenderedEmail: ...


class EmailRenderer(Protocol):
    """Renders a template, possibly in another process (adapter:
    sendtime.server.rendering.RenderPool); the pipeline renders in place without one."""

    async def render(
        self,
        template: EmailTemplate,
        context: Mapping[str, Any],
        *,
        timeout_s: float | None = None,
    ) -> RenderedEmail:
        """Within about ``timeout_s``: past it, the email is rendered in place."""
        ...


class TemplateSource(Protocol):
    """Parsed templates by id (adapter: sendtime.server.rendering.TemplateStore)."""

    def get(self, template_id: str) -> EmailTemplate: ...


class UpstreamSource(Protocol):
    """An upstream provider as the pipeline sees it (adapter: sendtime.server.upstream)."""

    name: str
    host: str
    timeout_s: float
    ttl_s: float
    stale_ttl_s: float

    def url_for(self, values: Mapping[str, str]) -> str: ...

    async def fetch(self, url: str, budget_s: float) -> Any: ...


class ContentObserver(Protocol):
    """Told of every answer (metrics); the blocks as the caller gets them."""

    def answered(self, call: str, blocks: Sequence[Block], budget_s: float, elapsed_s: float) -> None:
        """``call`` is "content" or "email"; ``budget_s`` the caller's whole budget."""
        ...

    def shed(self, call: str) -> None:
        """A call was turned away at admission: its blocks from cache or
        fallback at once ("content"), or refused as overloaded ("email")."""
        ...

    def late(self, call: str) -> None:
        """An answer left after its caller's deadline."""
        ...


class MissingValueError(Exception):
    """The block needs a user field the profile lacks (raised by UpstreamSource.url_for)."""


class RefusedUrlError(Exception):
    """The URL the user's fields make is refused: a host not allowed, or a path
    segment "." or "..". That block falls back; the call goes on (raised by
    UpstreamSource.url_for)."""


@dataclass(frozen=True, slots=True)
class ContentPolicy:
    block_ttl_s: float
    block_stale_ttl_s: float
    min_fetch_s: float
    cache_results: bool
    recommendations_size: int
    recently_viewed_size: int
    drop_out_of_stock: bool
    offers: tuple[builtin.OfferRule, ...] = ()
    #: Kept back from every budget for encoding and sending the answer, so it
    #: arrives before the caller's deadline rather than at it.
    answer_reserve_s: float = 0.005
    #: ... or this share of the budget, whichever is more.
    answer_reserve_share: float = 0.1
    #: ... plus this much for every other call in flight: when many calls give
    #: up on a slow source at the same moment (their deadlines alike), their
    #: answers leave the loop one after another, the last one after all others.
    answer_reserve_per_call_s: float = 0.00025
    #: Kept back from a whole-email budget, on top, for Liquid and MJML.
    render_reserve_s: float = 0.015
    #: Links every email gets (unsubscribe, preferences, view in browser).
    links: Mapping[str, str] = field(default_factory=dict)
    #: After a failed fetch, the same key is not fetched again for this long.
    negative_ttl_s: float = 2.0


#: What one call is assumed to take before any was timed (seconds).
_FIRST_INTERVAL_S: Final = 0.002
#: Weight of the latest interval in the running estimate: about one
#: concurrency's worth of answers (64) makes the estimate.
_INTERVAL_WEIGHT: Final = 0.02


class Backlog:
    """The calls admitted and not yet answered, and how fast the server
    answers them: the time between answers while it is busy, as a running
    estimate. By Little's law a call let in now waits about ``admitted``
    such intervals; that (not a loop-lag reading, which under load is the
    length of a loop iteration running many calls' steps) decides whether it
    can be answered in time. Counts every admitted call, render included, and
    measures whatever the server spends between answers (shed calls, ingest,
    answers in the transport), so it needs no per-kind cost model."""

    __slots__ = ("_clock", "_interval_s", "_last_answer", "admitted")

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.admitted = 0
        self._interval_s = _FIRST_INTERVAL_S
        #: When the last call was answered while others stayed admitted (or
        #: the first was admitted after an idle spell); None while idle.
        self._last_answer: float | None = None

    @property
    def interval_s(self) -> float:
        return self._interval_s

    def wait_s(self) -> float:
        """How long a call admitted now would take to be answered."""
        return (self.admitted + 1) * self._interval_s

    def admit(self) -> None:
        if self.admitted == 0:
            self._last_answer = self._clock()  # busy from now on
        self.admitted += 1

    def answered(self) -> None:
        self.admitted -= 1
        now = self._clock()
        if self._last_answer is not None:
            self._interval_s += _INTERVAL_WEIGHT * (now - self._last_answer - self._interval_s)
        self._last_answer = now if self.admitted > 0 else None


class ContentPipeline:
    def __init__(
        self,
        *,
        profiles: ProfileBook,
        catalog: Catalog,
        recommender: Recommender,
        cache: BlockCache,
        upstreams: Mapping[str, UpstreamSource],
        templates: TemplateSource,
        policy: ContentPolicy,
        max_concurrent: int,
        clock: Callable[[], float] = time.monotonic,
        observer: ContentObserver | None = None,
        tracer: Tracer | None = None,
        loop_lag: Callable[[], float] | None = None,
        renderer: EmailRenderer | None = None,
        public_base_url: Callable[[], str] | None = None,
    ) -> None:
        #: This server's public address, against which a catalog image_url
        #: that is a path (the demo's /demo/images/...) is made absolute.
        self._public_base_url = public_base_url
        #: Where Liquid and MJML run: None renders on the calling event loop.
        self._renderer = renderer
        #: How late the event loop currently runs (seconds), if measured.
        self._loop_lag = loop_lag
        self._observer = observer
        #: Spans for block fetches and renders (OpenTelemetry's API: a no-op
        #: unless the server was configured to trace). None: no spans at all.
        self._tracer = tracer
        self._profiles = profiles
        self._catalog = catalog
        self._recommender = recommender
        self._cache = cache
        self._upstreams = dict(upstreams)
        self._templates = templates
        self._policy = policy
        self._clock = clock
        self._max_concurrent = max_concurrent
        self._in_flight = 0
        self._backlog = Backlog(clock)

    @property
    def in_flight(self) -> int:
        """Requests being answered now."""
        return self._in_flight

    def base_url(self) -> str:
        """Where this server is reached from outside ("" when not told)."""
        return self._public_base_url() if self._public_base_url is not None else ""

    def invalidate_user(self, profile_key: str) -> None:
        self._cache.invalidate_tag(profile_key)

    def invalidate_catalog(self) -> None:
        self._cache.invalidate_tag("catalog")

    async def content(
        self, identity: Identity, names: Sequence[str], context: ContentContext, budget_s: float
    ) -> ContentAnswer:
        """Every named block (all built-in ones when ``names`` is empty), within ``budget_s``."""
        wanted = list(dict.fromkeys(names)) or list(builtin.BUILT_IN_BLOCKS)
        if len(wanted) > MAX_BLOCKS:
            raise InvalidInput.field("blocks", f"asks for {len(wanted)} blocks; the limit is {MAX_BLOCKS}")
        started = self._clock()
        backlog = self._backlog
        fetch_budget = budget_s - self._answer_reserve(budget_s)
        ahead_s = backlog.wait_s() if backlog.admitted else 0.0
        if fetch_budget >= self._policy.min_fetch_s and self._lag() + ahead_s > fetch_budget:
            # the calls let in before would keep this one past its deadline:
            # cached or fallback content at once, each block saying so
            answer = self._shed_content(identity, wanted, context, fetch_budget)
        else:
            backlog.admit()
            try:
                answer = await self._gather(
                    identity, wanted, context, fetch_budget, with_user=False, call="content"
                )
            finally:
                backlog.answered()
        answer.deadline = started + budget_s
        if self._observer is not None:
            self._observer.answered("content", answer.blocks, budget_s, answer.elapsed_s)
        return answer

    def left(self, call: str, deadline: float) -> None:
        """An edge hands the answer of ``call`` ("content" or "email") to its
        transport now: counted if that is after the caller's deadline."""
        if self._clock() > deadline and self._observer is not None:
            self._observer.late(call)

    def _lag(self) -> float:
        """How late the loop runs now: about how long a request waited between
        its arrival and its handler's first step."""
        return self._loop_lag() if self._loop_lag is not None else 0.0

    def _shed_content(
        self, identity: Identity, names: list[str], context: ContentContext, budget_s: float
    ) -> ContentAnswer:
        if self._observer is not None:
            self._observer.shed("content")
        request = _Request(self, identity, context, self._clock() + budget_s, names=names)
        blocks = [self._without_fetching(request, name, Reason.OVERLOADED) for name in names]
        return ContentAnswer(blocks=blocks, budget_s=budget_s, elapsed_s=0.0, user=request.user_data())

    def _shed_email(self, budget_s: float) -> str | None:
        """Why a whole email cannot be made within ``budget_s`` now, or None.
        It waited about a loop iteration (``lag``) before its handler ran, and
        will be answered after the calls admitted before it (Backlog.wait_s,
        from the measured rate of answers, renders included); that, the
        shortest fetch, and the fixed part of the answer's reserve must fit."""
        if self._in_flight >= self._max_concurrent:
            return f"{self._in_flight} content calls are being answered already"
        lag = self._lag()
        backlog = self._backlog
        policy = self._policy
        needed = (
            lag
            + (backlog.wait_s() if backlog.admitted else 0.0)
            + policy.min_fetch_s
            + max(policy.answer_reserve_s, budget_s * policy.answer_reserve_share)
        )
        if needed > budget_s:
            return (
                f"it would be answered in about {needed * 1000:.0f} ms ({backlog.admitted} calls ahead,"
                f" one answered every {backlog.interval_s * 1000:.1f} ms, the server {lag * 1000:.0f} ms behind)"
                f" and the budget is {budget_s * 1000:.0f} ms"
            )
        return None

    async def email(
        self,
        template_id: str,
        identity: Identity,
        context: ContentContext,
        budget_s: float,
        *,
        may_shed: bool = True,
    ) -> EmailAnswer:
        """A whole email from a template: its blocks within the budget less the
        render reserve, then Liquid and MJML with each missing block's fallback.
        Raises Overloaded, before any work, when it cannot be made within the
        budget now, unless ``may_shed`` is False (a flow send, which has no
        caller waiting and must not be dropped)."""
        started = self._clock()
        template = self._templates.get(template_id)
        answer_reserve = self._answer_reserve(budget_s)
        refused = self._shed_email(budget_s) if may_shed else None
        if refused is not None:
            # Shed at admission, before any work: an email that would come
            # after its deadline helps nobody. The caller retries later.
            if self._observer is not None:
                self._observer.shed("email")
            raise Overloaded(f"the email cannot be made in time: {refused}; retry in a second")
        self._backlog.admit()
        try:
            return await self._make_email(template, identity, context, budget_s, answer_reserve, started)
        finally:
            self._backlog.answered()

    async def _make_email(
        self,
        template: EmailTemplate,
        identity: Identity,
        context: ContentContext,
        budget_s: float,
        answer_reserve: float,
        started: float,
    ) -> EmailAnswer:
        render_deadline = started + budget_s - answer_reserve
        fetch_budget = budget_s - answer_reserve - self._policy.render_reserve_s
        content = await self._gather(
            identity, list(template.blocks), context, fetch_budget, with_user=True, call="email"
        )
        render_context: dict[str, Any] = {block.name: block.data for block in content.blocks}
        render_context["user"] = content.user
        render_context["links"] = {**self._policy.links, **dict(context.links)}
        if self._tracer is None:
            email = await self._render(template, render_context, render_deadline)
        else:
            with self._tracer.start_as_current_span(
                "sendtime.render", attributes={"sendtime.template": template.id}
            ) as span:
                email = await self._render(template, render_context, render_deadline)
                span.set_attribute("sendtime.template.version", email.version)
        blocks = [
            Block(
                b.name,
                None,
                Source.FALLBACK,
                Reason.UPSTREAM_ERROR,
                detail="the template could not render its data",
            )
            if b.name in email.fell_back and b.source is not Source.FALLBACK
            else b
            for b in content.blocks
        ]
        elapsed_s = self._clock() - started
        if self._observer is not None:
            self._observer.answered("email", blocks, budget_s, elapsed_s)
        return EmailAnswer(
            email=email, blocks=blocks, content=content, elapsed_s=elapsed_s, deadline=started + budget_s
        )

    async def _render(
        self, template: EmailTemplate, context: Mapping[str, Any], deadline: float
    ) -> RenderedEmail:
        if self._renderer is None:
            return template.render(context)
        # Half the time left for another process; the other half stays for
        # rendering in place should it be late (a render costs the same here).
        return await self._renderer.render(template, context, timeout_s=(deadline - self._clock()) / 2)

    def _answer_reserve(self, budget_s: float) -> float:
        # Under load the answer spends a while in the event loop and the
        # transport before it reaches the caller, and gRPC rounds a deadline
        # up when it sends it: keep a share of the budget, not only a constant.
        # And when the loop itself runs late, an answer waits that long too.
        lag = 2 * self._loop_lag() if self._loop_lag is not None else 0.0
        policy = self._policy
        # each other call in flight may be answered first: at the pace this
        # server answers when busy (measured), never less than the setting
        per_call = max(policy.answer_reserve_per_call_s, self._backlog.interval_s)
        queued = self._in_flight * per_call
        return min(
            max(policy.answer_reserve_s, budget_s * policy.answer_reserve_share, lag) + queued,
            budget_s / 2,
        )

    async def _gather(
        self,
        identity: Identity,
        names: list[str],
        context: ContentContext,
        budget_s: float,
        *,
        with_user: bool,
        call: str,
    ) -> ContentAnswer:
        started = self._clock()
        request = _Request(self, identity, context, started + budget_s, names=names)
        if budget_s < self._policy.min_fetch_s:
            blocks = [self._without_fetching(request, name, Reason.DEADLINE_TOO_SHORT) for name in names]
        elif self._in_flight >= self._max_concurrent:
            # Shed: too many calls at once. Cached or fallback content at
            # once, each block saying so. (Whether the call can be answered
            # in time, loop lag included, was decided at its admission: a
            # second look at the lag here emptied the blocks of emails that
            # had been let in, answering them fast but without their content.)
            if self._observer is not None:
                self._observer.shed(call)
            blocks = [self._without_fetching(request, name, Reason.OVERLOADED) for name in names]
        else:
            self._in_flight += 1
            try:
                # Fresh cached built-in blocks are answered here, with no task
                # each: the warm path is mostly cache hits.
                ready = [self._cached_block(request, name) for name in names]
                if self._tracer is None and request.profile_in_memory():
                    # First touch of a user whose profile is in memory: the
                    # built-in blocks are computed here, with no task each.
                    ready = [
                        block if block is not None else self._computed_now(request, name)
                        for name, block in zip(names, ready, strict=True)
                    ]
                fetches: list[Awaitable[Block | None]] = [
                    self._block(request, name)
                    for name, block in zip(names, ready, strict=True)
                    if block is None
                ]
                if with_user and not request.profile_in_memory():
                    fetches.append(request.user_in_time())
                fetched = iter(await asyncio.gather(*fetches)) if fetches else iter(())
                blocks = [block if block is not None else _not_none(next(fetched)) for block in ready]
            finally:
                self._in_flight -= 1
        return ContentAnswer(
            blocks=blocks, budget_s=budget_s, elapsed_s=self._clock() - started, user=request.user_data()
        )

    # -- one block ------------------------------------------------------------

    def _cache_key(self, request: _Request, name: str) -> str:
        return request.cache_key(name)

    def _cached_block(self, request: _Request, name: str) -> Block | None:
        if not self._policy.cache_results or name not in _BUILT_IN:
            return None
        found = self._cache.lookup_stale_ok(self._cache_key(request, name))
        if found is None or not found[2]:
            return None  # a miss or a stale entry: get_or_fetch decides
        value, age, _fresh = found
        return Block(name, value, Source.CACHED, None, age) if value is not None else _missing(name)

    def _computed_now(self, request: _Request, name: str) -> Block | None:
        """A built-in block computed in place from the profile in memory; None
        for any other block, or when the cache wants a fetch to decide."""
        compute = _BUILT_IN.get(name)
        if compute is None or name in self._upstreams:
            return None
        profile = request.profile_now()
        if not self._policy.cache_results:
            try:
                data = compute(self, profile, request)
            except Exception as error:  # a block's failure is the block's, never the call's
                return Block(name, None, Source.FALLBACK, Reason.UPSTREAM_ERROR, detail=str(error))
            return Block(name, data, Source.FRESH) if data is not None else _missing(name)
        fetched = self._cache.fill_now(
            self._cache_key(request, name),
            lambda: compute(self, profile, request),
            ttl=self._policy.block_ttl_s,
            stale_ttl=self._policy.block_stale_ttl_s,
            tags=(request.identity.key, "catalog"),
            negative_ttl=self._policy.negative_ttl_s,
        )
        return _from_fetched(name, fetched) if fetched is not None else None

    def _without_fetching(self, request: _Request, name: str, reason: Reason) -> Block:
        key = self._stored_key(request, name)
        found = self._cache.lookup_stale_ok(key) if key is not None else None
        if found is not None and found[0] is not None:
            value, age, fresh = found
            return Block(
                name, value, Source.CACHED if fresh else Source.STALE, None if fresh else reason, age
            )
        return Block(name, None, Source.FALLBACK, reason)

    def _stored_key(self, request: _Request, name: str) -> str | None:
        """Where the block's last value is cached, when that is known with no
        I/O: a built-in block's key, or an upstream block's URL key (which
        takes the user's fields: known only when the profile is in memory)."""
        upstream = self._upstreams.get(name)
        if upstream is None:
            return self._cache_key(request, name)
        if not request.profile_in_memory():
            return None
        try:
            return _upstream_key(name, upstream.url_for(request.url_values_of(request.profile_now())))
        except (MissingValueError, RefusedUrlError):
            return None

    async def _block(self, request: _Request, name: str) -> Block:
        if self._tracer is None:
            return await self._fetch_block(request, name)
        with self._tracer.start_as_current_span(
            "sendtime.block", attributes={"sendtime.block": name}
        ) as span:
            block = await self._fetch_block(request, name)
            span.set_attribute("sendtime.block.source", block.source.value)
            if block.reason is not None:
                span.set_attribute("sendtime.block.reason", block.reason.value)
            return block

    async def _fetch_block(self, request: _Request, name: str) -> Block:
        upstream = self._upstreams.get(name)
        if upstream is not None:
            return await self._upstream_block(request, upstream)
        compute = _BUILT_IN.get(name)
        if compute is None:
            return Block(
                name, None, Source.FALLBACK, Reason.MISSING_DATA, detail=f"no block is named {name!r}"
            )

        async def fetch() -> Any:
            return compute(self, await request.profile(), request)

        if not self._policy.cache_results:
            return await self._uncached(request, name, fetch)
        fetched = await self._cache.get_or_fetch(
            self._cache_key(request, name),
            fetch,
            ttl=self._policy.block_ttl_s,
            stale_ttl=self._policy.block_stale_ttl_s,
            timeout=request.remaining(),
            tags=(request.identity.key, "catalog"),
            negative_ttl=self._policy.negative_ttl_s,
            breaker_key=None,
        )
        return _from_fetched(name, fetched)

    async def _upstream_block(self, request: _Request, upstream: UpstreamSource) -> Block:
        name = upstream.name
        try:
            url = upstream.url_for(await request.url_values())
        except MissingValueError as missing:
            return Block(name, None, Source.FALLBACK, Reason.MISSING_DATA, detail=str(missing))
        except RefusedUrlError as refused:
            return Block(name, None, Source.FALLBACK, Reason.UPSTREAM_ERROR, detail=str(refused))

        async def fetch() -> Any:
            # Bounded by the provider's own timeout, not this caller's budget:
            # the call is shared by every request for the key (single flight),
            # and an answer that comes after this caller gave up still fills
            # the cache for the next send. Each caller waits only its budget.
            return await upstream.fetch(url, upstream.timeout_s)

        if not self._policy.cache_results:
            return await self._uncached(request, name, fetch)
        fetched = await self._cache.get_or_fetch(
            _upstream_key(name, url),
            fetch,
            ttl=upstream.ttl_s,
            stale_ttl=upstream.stale_ttl_s,
            timeout=request.remaining(),
            tags=(f"upstream:{name}",),
            negative_ttl=self._policy.negative_ttl_s,
            breaker_key=upstream.host,
        )
        return _from_fetched(name, fetched)

    async def _uncached(self, request: _Request, name: str, fetch: Callable[[], Awaitable[Any]]) -> Block:
        try:
            async with asyncio.timeout(max(request.remaining(), 0.0)):
                data = await fetch()
        except TimeoutError:
            return Block(name, None, Source.FALLBACK, Reason.TIMEOUT)
        except Exception as error:  # an upstream's failure is the block's, never the call's
            return Block(name, None, Source.FALLBACK, Reason.UPSTREAM_ERROR, detail=str(error))
        if data is None:
            return Block(name, None, Source.FALLBACK, Reason.MISSING_DATA)
        return Block(name, data, Source.FRESH)


def _upstream_key(name: str, url: str) -> str:
    """An upstream block's cache key: by its URL, which holds the user's
    fields, and unlike any built-in block's key (which starts with a digit)."""
    return f"upstream|{len(name)}:{name}|{url}"


def _from_fetched(name: str, fetched: Fetched) -> Block:
    source, reason = fetched.source, fetched.reason
    if source is Source.FRESH:
        return Block(name, fetched.value, source) if fetched.value is not None else _missing(name)
    if fetched.value is None and source is not Source.FALLBACK:
        # an answer of "nothing to show" (an empty cart) is a fallback to the caller
        return _missing(name)
    if source is Source.FALLBACK and reason is None:
        reason = Reason.MISSING_DATA
    return Block(name, fetched.value, source, reason, fetched.age, fetched.detail)


def _not_none(block: Block | None) -> Block:
    assert block is not None  # only user_in_time answers None, and it comes last
    return block


def _missing(name: str) -> Block:
    return Block(name, None, Source.FALLBACK, Reason.MISSING_DATA)


class _Request:
    """One content request: its deadline, and the profile read at most once."""

    def __init__(
        self,
        pipeline: ContentPipeline,
        identity: Identity,
        context: ContentContext,
        deadline: float,
        *,
        names: Sequence[str] = (),
    ):
        self.pipeline = pipeline
        self.identity = identity
        self.context = context
        self.deadline = deadline
        #: One answer shows a product once: recommendations asked for beside a
        #: recently viewed block leave its products out (while enough others
        #: remain), a different answer from the block alone, so cached apart.
        self.recommend_beside_viewed = (
            BlockName.RECENTLY_VIEWED in names and BlockName.RECOMMENDATIONS in names
        )
        self._profile: asyncio.Future[ProfileView | None] | None = None
        self._key_prefix: str | None = None
        self._base_url: str | None = None

    def remaining(self) -> float:
        return self.deadline - self.pipeline._clock()

    def base_url(self) -> str:
        """The server's public address, read once per call (every product link of every block takes it)."""
        if self._base_url is None:
            self._base_url = self.pipeline.base_url()
        return self._base_url

    def cache_key(self, name: str) -> str:
        """The block's cache key for this user and context. Every part but the
        last is length-prefixed, so no user id, campaign or cart id (which may
        hold any character, the separator too) can spell another call's key."""
        if self._key_prefix is None:
            key, campaign = self.identity.key, self.context.campaign
            self._key_prefix = f"{len(key)}:{key}|{len(campaign)}:{campaign}|{self.context.cart_id}"
        if name == BlockName.RECOMMENDATIONS and self.recommend_beside_viewed:
            name = "recommendations+recently_viewed"  # no built-in or upstream block name holds a "+"
        return f"{len(name)}:{name}|{self._key_prefix}"

    def profile_in_memory(self) -> bool:
        """True when the profile has been read, or is in memory (then it is
        read now, with no task and no store hop)."""
        if self._profile is None:
            stored = self.pipeline._profiles.in_memory(self.identity.key)
            if stored is None:
                return False
            self._profile = asyncio.get_running_loop().create_future()
            self._profile.set_result(view(stored))
            return True
        return self._profile.done() and not self._profile.cancelled() and self._profile.exception() is None

    def profile_now(self) -> ProfileView | None:
        """The profile read already (profile_in_memory() said True)."""
        assert self._profile is not None
        return self._profile.result()

    async def profile(self) -> ProfileView | None:
        if self._profile is None and not self.profile_in_memory():
            self._profile = asyncio.ensure_future(self._load_profile())
        assert self._profile is not None
        if self._profile.done():
            return self._profile.result()
        return await asyncio.shield(self._profile)

    async def user_in_time(self) -> None:
        """Read the profile for the user's fields, unless the deadline comes first."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(self.remaining(), 0.0)):
                await self.profile()

    async def _load_profile(self) -> ProfileView | None:
        stored = await self.pipeline._profiles.get(self.identity.key)
        return view(stored) if stored is not None else None

    def user_data(self) -> dict[str, Any]:
        """The user as templates see it, from the profile if it was read."""
        data: dict[str, Any] = {}
        if self._profile is not None and self._profile.done() and not self._profile.cancelled():
            profile = self._profile.result()
            if profile is not None:
                data.update(profile.extra_traits)
                data.update(profile.traits)
        # After the traits: a trait named "id" must not pass for the user asked for.
        data["id"] = self.identity.user_id or self.identity.anonymous_id
        if self.context.locale:
            data["locale"] = self.context.locale
        return data

    async def url_values(self) -> dict[str, str]:
        return self.url_values_of(await self.profile())

    def url_values_of(self, profile: ProfileView | None) -> dict[str, str]:
        """What an upstream URL template may name: the user's fields and the context."""
        values: dict[str, str] = {}
        if profile is not None:
            for key, value in {**profile.extra_traits, **profile.traits}.items():
                if isinstance(value, str | int | float) and not isinstance(value, bool):
                    values[f"user.{key}"] = str(value)
        # After the traits: a trait named "id" must not redirect the call to another user.
        values["user.id"] = self.identity.user_id or self.identity.anonymous_id
        for key in ("campaign", "locale", "cart_id"):
            value = getattr(self.context, key)
            if value:
                values[f"context.{key}"] = value
        return values


# -- the built-in blocks, as functions of (pipeline, profile, request) -----------


# Each returns None when there is nothing to show (no profile, empty cart):
# a valid answer, cached like any other, that the caller sees as a fallback.


def _cart(pipeline: ContentPipeline, profile: ProfileView | None, request: _Request) -> Any:
    if profile is None:
        return None
    return builtin.cart(
        profile,
        pipeline._catalog,
        cart_id=request.context.cart_id,
        drop_out_of_stock=pipeline._policy.drop_out_of_stock,
        base_url=request.base_url(),
    )


def _recommendations(pipeline: ContentPipeline, profile: ProfileView | None, request: _Request) -> Any:
    if profile is None:  # a stranger still gets the popular products
        profile = view(_EMPTY_PROFILE)
    policy = pipeline._policy
    shown_beside = (
        [seen.product.product_id for seen in profile.recently_viewed[: policy.recently_viewed_size]]
        if request.recommend_beside_viewed
        else ()
    )
    return builtin.recommendations(
        profile,
        pipeline._catalog,
        pipeline._recommender,
        size=policy.recommendations_size,
        shown_beside=shown_beside,
        base_url=request.base_url(),
    )


def _recently_viewed(pipeline: ContentPipeline, profile: ProfileView | None, request: _Request) -> Any:
    if profile is None:
        return None
    return builtin.recently_viewed(
        profile, pipeline._catalog, size=pipeline._policy.recently_viewed_size, base_url=request.base_url()
    )


def _offers(pipeline: ContentPipeline, profile: ProfileView | None, request: _Request) -> Any:
    cart = _cart(pipeline, profile, request)
    return builtin.offers(pipeline._policy.offers, cart, campaign=request.context.campaign)


def _last_order(pipeline: ContentPipeline, profile: ProfileView | None, request: _Request) -> Any:
    if profile is None:
        return None
    return builtin.last_order(profile, pipeline._catalog, base_url=request.base_url())


_BUILT_IN: Final[dict[str, Callable[[ContentPipeline, ProfileView | None, _Request], Any]]] = {
    BlockName.CART: _cart,
    BlockName.RECOMMENDATIONS: _recommendations,
    BlockName.RECENTLY_VIEWED: _recently_viewed,
    BlockName.OFFERS: _offers,
    BlockName.LAST_ORDER: _last_order,
}
_EMPTY_PROFILE: Final = Profile()
