"""RenderPool when its workers misbehave: stuck, behind, writing stray output
or garbage, dying at start or failing to start, signalled with the rest of
the process group. Every case still gives the caller its email in time.

The workers are real processes; some run the real worker with a probe
wrapped around its render (it sleeps, writes to fd 1 or logs on request, as a
slow render or a C extension would), some are small scripts that break the
protocol on purpose."""

from __future__ import annotations

import asyncio
import os
import pickle
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sendtime.server.rendering import RenderPool, TemplateError, TemplateStore, _worker, load_template
from sendtime.server.rendering._pool import LENGTH_BYTES, MAX_WAITING, _Worker
from tests.unit.test_rendering import TEMPLATES, full_context

# slow: render worker processes, stuck and killed (make test-fast leaves them out)
pytestmark = pytest.mark.slow

PROBED_WORKER = """
import logging, os, time
from sendtime.server.rendering import _worker

real_render = _worker.TemplateRenderer.render

def render(self, path, version, context):
    probe = context.get("probe", {})
    time.sleep(probe.get("sleep_s", 0))
    if "stdout" in probe:
        os.write(1, probe["stdout"])  # below Python's sys.stdout, as C code would
    logging.getLogger("probe").warning("rendered in pid %d", os.getpid())
    return real_render(self, path, version, context)

_worker.TemplateRenderer.render = render
_worker.main()
"""
PROBED: tuple[str, ...] = (sys.executable, "-c", PROBED_WORKER)


@pytest.fixture
async def probed() -> AsyncIterator[RenderPool]:
    pool = RenderPool(1, argv=PROBED)
    await pool.start()
    try:
        yield pool
    finally:
        await pool.aclose()


def _only_worker(pool: RenderPool) -> _Worker:
    worker = pool._workers[0]
    assert worker is not None
    return worker


def probe_context(**probe: Any) -> dict[str, Any]:
    context = full_context()
    context["probe"] = probe
    return context


async def _replacement(pool: RenderPool, old: _Worker, within_s: float = 10.0) -> _Worker:
    async with asyncio.timeout(within_s):
        while True:
            worker = pool._workers[0]
            if worker is not None and worker is not old and worker.ready.done():
                return worker
            await asyncio.sleep(0.02)


async def test_a_stuck_worker_costs_the_caller_only_its_time_limit_then_is_replaced(
    probed: RenderPool, caplog: pytest.LogCaptureFixture
) -> None:
    template = TemplateStore(TEMPLATES).get("abandoned_cart")
    stuck = _only_worker(probed)
    context = probe_context(sleep_s=60)
    started = time.monotonic()
    email = await probed.render(template, context, timeout_s=0.2)
    assert time.monotonic() - started < 0.8
    assert email == template.render(context)  # rendered in the server
    # far overdue (several times the limit, at least a second): killed, replaced
    replacement = await _replacement(probed, stuck)
    assert not stuck.alive
    assert any("stuck" in r.getMessage() for r in caplog.records)
    assert await probed.render(template, full_context(), timeout_s=5) == template.render(full_context())
    assert replacement.answered == 1


async def test_no_time_limit_given_still_means_one(probed: RenderPool) -> None:
    template = TemplateStore(TEMPLATES).get("post_purchase")
    context = probe_context(sleep_s=60)
    email = await asyncio.wait_for(probed.render(template, context), 5)
    assert email == template.render(context)


async def test_a_worker_far_behind_gets_no_more_work(probed: RenderPool) -> None:
    template = TemplateStore(TEMPLATES).get("abandoned_cart")
    worker = _only_worker(probed)
    slow = probe_context(sleep_s=0.05)
    queued = [asyncio.ensure_future(probed.render(template, slow, timeout_s=10)) for _ in range(MAX_WAITING)]
    await asyncio.sleep(0)
    assert worker.waiting == MAX_WAITING
    started = time.monotonic()
    email = await probed.render(template, full_context(), timeout_s=10)
    assert time.monotonic() - started < 0.25  # not behind MAX_WAITING x 0.05 s of the worker's work
    assert email == template.render(full_context())
    assert worker.answered == 0
    assert all(e == template.render(slow) for e in await asyncio.gather(*queued))
    assert worker.answered == MAX_WAITING  # those were the worker's


async def test_stray_output_on_fd_1_in_the_worker_does_not_corrupt_its_answers(
    probed: RenderPool, caplog: pytest.LogCaptureFixture
) -> None:
    template = TemplateStore(TEMPLATES).get("abandoned_cart")
    worker = _only_worker(probed)
    context = probe_context(stdout=b"a C library says hello\n")
    with caplog.at_level("WARNING"):
        email = await probed.render(template, context, timeout_s=5)
        again = await probed.render(template, context, timeout_s=5)
    assert email == again == template.render(context)
    assert worker.alive
    assert worker.answered == 2
    assert [r.name for r in caplog.records if r.name == "probe"] == ["probe", "probe"]


GARBAGE_WORKER = """
import sys

answers = sys.stdout.buffer
answers.write((5).to_bytes(4, "big") + b"ready")
answers.flush()
sys.stdin.buffer.read(4)
answers.write(b"\\xff" * 64)  # not a frame: far longer than any answer
answers.flush()
sys.stdin.buffer.read()
"""


async def test_a_frame_longer_than_any_answer_is_the_workers_death(caplog: pytest.LogCaptureFixture) -> None:
    template = TemplateStore(TEMPLATES).get("abandoned_cart")
    pool = RenderPool(1, argv=(sys.executable, "-c", GARBAGE_WORKER))
    await pool.start()
    try:
        worker = _only_worker(pool)
        started = time.monotonic()
        email = await pool.render(template, full_context(), timeout_s=30)
        assert time.monotonic() - started < 2  # not the time limit: the worker is gone
        assert email == template.render(full_context())
        assert not worker.alive
        await asyncio.wait_for(asyncio.shield(worker._exited), 5)  # killed
        assert any("not an answer" in r.getMessage() for r in caplog.records)
    finally:
        await pool.aclose()


async def test_a_worker_that_keeps_dying_is_restarted_ever_more_slowly_without_delaying_renders(
    caplog: pytest.LogCaptureFixture,
) -> None:
    template = TemplateStore(TEMPLATES).get("post_purchase")
    expected = template.render(full_context())
    pool = RenderPool(1, argv=(sys.executable, "-c", "import sys; sys.exit(3)"))
    with caplog.at_level("WARNING"):
        await pool.start()
        try:
            slowest = 0.0
            until = time.monotonic() + 2.6
            while time.monotonic() < until:
                started = time.monotonic()
                assert await pool.render(template, full_context(), timeout_s=5) == expected
                slowest = max(slowest, time.monotonic() - started)
                await asyncio.sleep(0.01)
        finally:
            await pool.aclose()
    deaths = [r.getMessage() for r in caplog.records if "exited with code" in r.getMessage()]
    # deaths at about 0, 0.5 and 1.5 s; the next restart would be at 3.5 s
    assert 2 <= len(deaths) <= 3, deaths
    assert all("exited with code 3" in d for d in deaths)
    delays = [float(re.findall(r"in ([\d.]+) s", d)[0]) for d in deaths]
    assert delays == sorted(delays)
    assert delays[-1] > delays[0]
    assert slowest < 0.1  # no render waited for a worker to start


async def test_a_worker_that_cannot_be_started_leaves_rendering_to_the_server(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    template = TemplateStore(TEMPLATES).get("post_purchase")
    pool = RenderPool(1, argv=(str(tmp_path / "no-such-python"),))
    await pool.start()
    try:
        assert await pool.render(template, full_context()) == template.render(full_context())
        assert any("cannot start render worker" in r.getMessage() for r in caplog.records)
    finally:
        await pool.aclose()


async def test_a_request_the_worker_cannot_unpickle_is_answered_none() -> None:
    pool = RenderPool(1)
    await pool.start()
    try:
        worker = _only_worker(pool)
        answer = await asyncio.wait_for(worker.ask(b"not a pickle"), 5)
        assert pickle.loads(answer) == (None, [])  # noqa: S301 (our own worker)
        assert worker.alive
        template = TemplateStore(TEMPLATES).get("post_purchase")
        assert await pool.render(template, full_context(), timeout_s=5) == template.render(full_context())
        assert worker.answered == 2
    finally:
        await pool.aclose()


async def test_an_answer_after_the_exit_was_reported_is_dropped() -> None:
    # asyncio may report a worker's exit before its last output
    worker = _Worker()
    worker.pipe_data_received(1, (5).to_bytes(LENGTH_BYTES, "big") + b"ready")
    worker.process_exited()
    answer = pickle.dumps((None, []))
    worker.pipe_data_received(1, len(answer).to_bytes(LENGTH_BYTES, "big") + answer)
    assert not worker.alive


async def test_a_dead_workers_transport_is_closed_when_it_is_replaced() -> None:
    pool = RenderPool(1)
    await pool.start()
    try:
        dead = _only_worker(pool)
        assert dead._transport is not None
        dead._transport.kill()
        await _replacement(pool, dead)
        assert dead._transport.is_closing()
    finally:
        await pool.aclose()


async def test_workers_outlive_sigint_and_sigterm_until_the_server_closes_them() -> None:
    template = TemplateStore(TEMPLATES).get("abandoned_cart")
    pool = RenderPool(1)
    await pool.start()
    worker = _only_worker(pool)
    assert worker.pid is not None
    os.kill(worker.pid, signal.SIGINT)
    os.kill(worker.pid, signal.SIGTERM)
    await asyncio.sleep(0.3)
    assert worker.alive
    assert await pool.render(template, full_context(), timeout_s=5) == template.render(full_context())
    assert worker.answered == 1
    await pool.aclose()
    assert worker.returncode == 0  # ended at end of its input


def test_the_worker_reads_a_version_it_could_not_load_only_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[Path] = []
    real_load = load_template

    def counting_load(path: Path, **kwargs: Any) -> Any:
        loads.append(path)
        return real_load(path, **kwargs)

    monkeypatch.setattr(_worker, "load_template", counting_load)
    path = tmp_path / "welcome.mjml.liquid"
    path.write_text('+++\nid = "welcome"\n+++\n<mjml></mjml>\n')  # no subject: does not parse
    renderer = _worker.TemplateRenderer()
    for _ in range(3):
        assert renderer.render(str(path), "v1", full_context()) is None
    assert len(loads) == 1
    path.write_text('+++\nid = "welcome"\nsubject = ""\n+++\n<mjml></mjml>\n')  # edited: read again
    renderer.render(str(path), "v1", full_context())
    assert len(loads) == 2


FAILS_FOR_SOME_USERS = (
    '+++\nid = "welcome"\nsubject = "Hello"\n+++\n'
    "<mjml><mj-body><mj-section><mj-column><mj-text>"
    "{% assign d = user.d | default: 1 %}{{ 10 | divided_by: d }}"
    "</mj-text></mj-column></mj-section></mj-body></mjml>\n"
)


async def test_a_render_that_fails_is_reported_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "welcome.mjml.liquid").write_text(FAILS_FOR_SOME_USERS)
    template = TemplateStore(tmp_path).get("welcome")
    pool = RenderPool(1)
    await pool.start()
    try:
        with caplog.at_level("INFO"), pytest.raises(TemplateError):
            await pool.render(template, {"user": {"d": 0}}, timeout_s=5)
        assert _only_worker(pool).answered == 1  # the worker tried first
    finally:
        await pool.aclose()
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "trying fallbacks" in m]) == 1, messages
    assert not [m for m in messages if "render worker" in m], messages
