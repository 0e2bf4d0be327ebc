"""RenderPool: emails rendered in worker processes are the ones the server
would render itself, and every way a worker cannot help (an edited template, a
worker that died, no pool) still gives the caller the server's own render."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sendtime.server.rendering import RenderPool, TemplateStore
from sendtime.server.rendering._pool import _CORES_RECHECK_S
from sendtime.server.rendering._worker import TemplateRenderer
from tests.unit.test_rendering import SHIPPED, TEMPLATES, full_context

# slow: render worker processes (make test-fast leaves them out)
pytestmark = pytest.mark.slow


@pytest.fixture
async def pool() -> AsyncIterator[RenderPool]:
    pool = RenderPool(2)
    await pool.start()
    assert all(w is not None and w.ready.done() for w in pool._workers), "start() waits for the workers"
    try:
        yield pool
    finally:
        await pool.aclose()


@pytest.mark.parametrize("template_id", SHIPPED)
async def test_a_worker_renders_what_the_server_would(pool: RenderPool, template_id: str) -> None:
    template = TemplateStore(TEMPLATES).get(template_id)
    context = full_context()
    assert await pool.render(template, context) == template.render(context)


async def test_many_renders_at_once_each_get_their_own_email(pool: RenderPool) -> None:
    template = TemplateStore(TEMPLATES).get("abandoned_cart")
    contexts = []
    for n in range(40):
        context = full_context()
        context["user"]["first_name"] = f"Shopper{n}"
        contexts.append(context)
    emails = await asyncio.gather(*(pool.render(template, c) for c in contexts))
    assert [e.subject.split(",")[0] for e in emails] == [f"Shopper{n}" for n in range(40)]


async def test_an_edited_template_is_rendered_at_the_version_the_server_parsed(
    pool: RenderPool, tmp_path: Path
) -> None:
    shutil.copy(TEMPLATES / "abandoned_cart.mjml.liquid", tmp_path)
    path = tmp_path / "abandoned_cart.mjml.liquid"
    template = TemplateStore(tmp_path).get("abandoned_cart")
    path.write_text(path.read_text().replace("you left something in your cart", "edited since"))
    email = await pool.render(template, full_context())
    assert email.version == template.version
    assert email.subject == "Anna, you left something in your cart"


async def test_a_dead_worker_costs_no_email(pool: RenderPool) -> None:
    template = TemplateStore(TEMPLATES).get("abandoned_cart")
    context = full_context()
    expected = template.render(context)
    for worker in pool._workers:
        assert worker is not None
        assert worker._transport is not None
        worker._transport.kill()
    # whether the kill has landed yet or not, the caller gets the email
    assert await pool.render(template, context) == expected
    await asyncio.sleep(0.2)
    assert await pool.render(template, context) == expected
    # a replacement starts in the background after a short delay (emails are
    # rendered in the server meanwhile), then takes the work
    await asyncio.sleep(1.0)
    assert await pool.render(template, context) == expected
    replacement = pool._workers[0]
    assert replacement is not None
    assert replacement.alive
    await asyncio.wait_for(replacement.ready, 30)
    assert await pool.render(template, context) == expected
    assert replacement.alive


async def test_no_processes_renders_in_place() -> None:
    pool = RenderPool(0)
    await pool.start()
    template = TemplateStore(TEMPLATES).get("post_purchase")
    assert await pool.render(template, full_context()) == template.render(full_context())
    await pool.aclose()


async def test_on_one_core_the_workers_are_left_idle_until_a_second_core_comes() -> None:
    cores = [1]
    pool = RenderPool(1, cores=lambda: cores[0])
    await pool.start()
    try:
        template = TemplateStore(TEMPLATES).get("abandoned_cart")
        worker = pool._workers[0]
        assert worker is not None
        # one core: a worker would take its CPU from the event loop's core
        assert await pool.render(template, full_context()) == template.render(full_context())
        assert worker.asked == 0
        # the process is given a second core: read again within the recheck
        cores[0] = 2
        pool._cores_read_at -= _CORES_RECHECK_S
        assert await pool.render(template, full_context()) == template.render(full_context())
        assert worker.asked == 1
    finally:
        await pool.aclose()


def test_the_worker_refuses_a_version_it_cannot_find(tmp_path: Path) -> None:
    renderer = TemplateRenderer()
    path = str(TEMPLATES / "abandoned_cart.mjml.liquid")
    assert renderer.render(path, "not-a-version", full_context()) is None
    assert renderer.render(str(tmp_path / "absent.mjml.liquid"), "x", full_context()) is None


async def test_what_a_worker_logs_comes_out_of_the_servers_log(
    pool: RenderPool, caplog: pytest.LogCaptureFixture
) -> None:
    template = TemplateStore(TEMPLATES).get("abandoned_cart")
    context = full_context()
    context["cart"]["item_count"] = "four"  # data the template cannot render: a warning, then fallbacks
    with caplog.at_level("WARNING"):
        email = await pool.render(template, context)
    # logged by the worker (the server has not rendered it), under the template module's logger
    assert [r.name for r in caplog.records if "trying fallbacks" in r.getMessage()] == [
        "sendtime.server.rendering._template"
    ]
    assert "cart" in email.fell_back
    assert email == template.render(context)
