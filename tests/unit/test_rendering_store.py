"""The template store: parse once, look at the file at most once per interval,
pick up changes, new and removed files without a restart, and keep serving the
last good version of a file whose edit broke it."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import pytest

from sendtime.server.domain.errors import NotFound
from sendtime.server.rendering import TemplateError, TemplateStore


def source(template_id: str, greeting: str) -> str:
    return (
        f'+++\nid = "{template_id}"\nsubject = "{greeting}, {{{{ user.first_name | default: \'you\' }}}}"\n'
        "[blocks.offers]\nfallback = { offers = [] }\n+++\n"
        "<mjml><mj-body><mj-section><mj-column>\n"
        f"<mj-text>{greeting} {{{{ user.first_name }}}}</mj-text>\n"
        "{% for offer in offers.offers %}<mj-text>{{ offer.code }}</mj-text>{% endfor %}\n"
        "</mj-column></mj-section></mj-body></mjml>\n"
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    (tmp_path / "hello.mjml.liquid").write_text(source("hello", "Hello"))
    (tmp_path / "notes.txt").write_text("not a template")
    return tmp_path


def write(path: Path, text: str) -> None:
    """Rewrite a file so that its stat changes even within one clock tick."""
    path.write_text(text)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_templates_are_parsed_once_and_served_from_memory(directory: Path, clock: Clock) -> None:
    store = TemplateStore(directory, check_interval_ms=500, clock=clock)
    first = store.get("hello")
    assert first.version == hashlib.sha256((directory / "hello.mjml.liquid").read_bytes()).hexdigest()[:12]
    clock.advance(10)
    assert store.get("hello") is first, "an unchanged file is not parsed again"
    assert store.render("hello", {"user": {"first_name": "Ann"}}).subject == "Hello, Ann"
    assert store.ids() == ["hello"]


def test_a_changed_file_is_picked_up_after_the_check_interval(directory: Path, clock: Clock) -> None:
    store = TemplateStore(directory, check_interval_ms=500, clock=clock)
    before = store.get("hello")

    write(directory / "hello.mjml.liquid", source("hello", "Welcome back"))
    clock.advance(0.2)
    assert store.get("hello") is before, "no stat before the interval has passed"

    clock.advance(0.4)
    after = store.get("hello")
    assert after.version != before.version
    email = store.render("hello", {"user": {"first_name": "Ann"}})
    assert email.subject == "Welcome back, Ann"
    assert "Welcome back Ann" in email.html
    assert email.version == after.version


def test_a_touched_but_unchanged_file_keeps_its_version(directory: Path, clock: Clock) -> None:
    store = TemplateStore(directory, check_interval_ms=0, clock=clock)
    before = store.get("hello")
    write(directory / "hello.mjml.liquid", (directory / "hello.mjml.liquid").read_text())
    assert store.get("hello") is before


def test_the_version_follows_the_content(directory: Path, clock: Clock) -> None:
    store = TemplateStore(directory, check_interval_ms=0, clock=clock)
    original = store.get("hello").version
    write(directory / "hello.mjml.liquid", source("hello", "Hi"))
    changed = store.get("hello").version
    write(directory / "hello.mjml.liquid", source("hello", "Hello"))
    assert store.get("hello").version == original != changed


def test_new_and_removed_files_are_seen_without_a_restart(directory: Path, clock: Clock) -> None:
    store = TemplateStore(directory, check_interval_ms=500, clock=clock)
    with pytest.raises(NotFound, match="no template 'welcome'") as caught:
        store.get("welcome")
    assert caught.value.reason == "TEMPLATE_NOT_FOUND"

    (directory / "welcome.mjml.liquid").write_text(source("welcome", "Welcome"))
    clock.advance(1)
    assert store.get("welcome").id == "welcome"
    assert store.ids() == ["hello", "welcome"]

    (directory / "hello.mjml.liquid").unlink()
    clock.advance(1)
    with pytest.raises(NotFound):
        store.get("hello")
    assert store.ids() == ["welcome"]


def test_a_broken_edit_keeps_the_last_good_version_and_reports_it(
    directory: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    store = TemplateStore(directory, check_interval_ms=0, clock=clock)
    good = store.get("hello")

    with caplog.at_level(logging.ERROR):
        write(directory / "hello.mjml.liquid", source("hello", "Hello").replace("{% endfor %}", ""))
        assert store.get("hello") is good
    assert "still serving version " + good.version in caplog.text
    errors = store.errors()
    assert list(errors) == ["hello"]
    assert "endfor" in errors["hello"].message
    assert [t.id for t in store.templates()] == ["hello"]

    write(directory / "hello.mjml.liquid", source("hello", "Fixed"))
    assert store.render("hello", {}).subject == "Fixed, you"
    assert store.errors() == {}


def test_a_template_that_never_parsed_raises_its_error(directory: Path, clock: Clock) -> None:
    (directory / "broken.mjml.liquid").write_text('+++\nid = "broken"\n+++\n<mjml></mjml>\n')
    store = TemplateStore(directory, check_interval_ms=0, clock=clock)

    with pytest.raises(TemplateError, match=r"broken\.mjml\.liquid: subject: .*missing required field"):
        store.get("broken")
    assert store.ids() == ["broken", "hello"]
    assert [t.id for t in store.templates()] == ["hello"]
    assert list(store.errors()) == ["broken"]


def test_a_missing_directory_is_an_empty_store(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path / "nowhere")
    assert store.ids() == []
    with pytest.raises(NotFound):
        store.get("hello")
