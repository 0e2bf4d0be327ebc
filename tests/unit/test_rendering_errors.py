"""Broken templates: every error names the file, the line where there is one,
and the field; nothing a template does can read a file."""

from __future__ import annotations

from pathlib import Path

import pytest

from sendtime.server.domain.errors import InvalidInput
from sendtime.server.rendering import TemplateError, load_template, parse_template

PATH = Path("templates/welcome.mjml.liquid")
BODY = (
    "<mjml><mj-body><mj-section><mj-column>\n"
    "<mj-text>Hi {{ user.first_name }}</mj-text>\n"
    "</mj-column></mj-section></mj-body></mjml>\n"
)


def front(extra: str = "") -> str:
    return f'+++\nid = "welcome"\nsubject = "Hello"\n{extra}+++\n'


def error_for(source: str) -> TemplateError:
    with pytest.raises(TemplateError) as caught:
        parse_template(PATH, source.encode())
    return caught.value


def test_a_minimal_template_parses() -> None:
    template = parse_template(PATH, (front() + BODY).encode())
    assert template.id == "welcome"
    assert template.blocks == {}
    assert template.spec.preheader == ""
    assert template.spec.text.wrap == 78


@pytest.mark.parametrize(
    ("source", "line", "field", "says"),
    [
        pytest.param("<mjml></mjml>", 1, "", "starts with a '+++' line", id="no front matter"),
        pytest.param('+++\nid = "welcome"\n', 1, "", "never closed", id="unclosed front matter"),
        pytest.param(front(), 5, "", "no MJML body", id="no body"),
        pytest.param('+++\nid = "welcome"\nsubject = \n+++\n' + BODY, 3, "", "not valid TOML", id="bad TOML"),
        pytest.param(
            front('colour = "red"\n') + BODY, 4, "colour", "unknown field `colour`", id="unknown key"
        ),
        pytest.param(
            '+++\nid = "welcome"\n+++\n' + BODY, None, "subject", "missing required field", id="no subject"
        ),
        pytest.param(
            '+++\nid = "hello"\nsubject = "x"\n+++\n' + BODY, 2, "id", "does not match the file name", id="id"
        ),
        pytest.param(
            front("[text]\nwrap = 'wide'\n") + BODY, 5, "text.wrap", "Expected `int`", id="wrong type"
        ),
        pytest.param(front("[text]\nwrap = -1\n") + BODY, 5, "text.wrap", ">= 0", id="out of range"),
        pytest.param(
            front("[blocks.cart]\n") + BODY, 4, "blocks.cart.fallback", "missing required", id="no fallback"
        ),
        pytest.param(
            front("[blocks.cart]\nfallback = {}\nfallbak = 1\n") + BODY,
            6,
            "blocks.cart.fallbak",
            "unknown field `fallbak`",
            id="typo in a block",
        ),
        pytest.param(
            front("[blocks.cart]\nfallback = []\n") + BODY,
            5,
            "blocks.cart.fallback",
            "Expected `object`",
            id="fallback type",
        ),
        pytest.param(
            front("[blocks.Cart]\nfallback = {}\n") + BODY, 4, "blocks.Cart", "lowercase", id="block name"
        ),
        pytest.param(
            front("[blocks.user]\nfallback = {}\n") + BODY, 4, "blocks.user", "reserved", id="reserved name"
        ),
    ],
)
def test_front_matter_errors_name_the_file_line_and_field(
    source: str, line: int | None, field: str, says: str
) -> None:
    error = error_for(source)
    assert error.path == str(PATH)
    assert error.line == line
    assert error.field_path == field
    assert says in error.problem
    assert error.message.startswith(f"{PATH}:{line}:" if line else f"{PATH}:")
    assert isinstance(error, InvalidInput)
    assert error.reason == "TEMPLATE_INVALID"
    assert error.violations[0].description == error.problem


@pytest.mark.parametrize(
    ("body", "line", "column", "says"),
    [
        pytest.param(
            "<mjml>\n<mj-body>\n{{ user.first_name | nope }}\n</mj-body></mjml>",
            7,
            22,
            "unknown filter 'nope'",
            id="filter",
        ),
        pytest.param(
            "<mjml>\n<mj-body>{% for x in user.list %}</mj-body></mjml>",
            None,
            None,
            "endfor",
            id="unclosed for",
        ),
        pytest.param(
            "<mjml>\n\n<mj-body>{% bogus %}</mj-body></mjml>",
            7,
            13,
            "unexpected tag 'bogus'",
            id="unknown tag",
        ),
        pytest.param(
            "<mjml>\n<mj-body>\n\n{{ cart.total }}</mj-body></mjml>",
            8,
            4,
            "'cart', which is neither a declared block",
            id="undeclared block",
        ),
        pytest.param(
            "<mjml><mj-body>{{ user.first_name | safe }}</mj-body></mjml>",
            5,
            37,
            "no way to output it raw",
            id="no safe filter",
        ),
        pytest.param(
            "<mjml><mj-body>\n{{ 1 | divided_by: 0 }}</mj-body></mjml>",
            6,
            8,
            "divide by 0",
            id="fails on fallbacks",
        ),
    ],
)
def test_liquid_errors_point_at_the_files_line(
    body: str, line: int | None, column: int | None, says: str
) -> None:
    error = error_for(front() + body)
    assert error.line == line
    assert error.column == column
    assert says in error.problem
    assert error.problem.startswith(("Liquid: ", "uses "))


def test_liquid_errors_in_the_subject_point_at_its_line() -> None:
    error = error_for('+++\nid = "welcome"\n\nsubject = "Hi {{ user.first_name | nope }}"\n+++\n' + BODY)
    assert (error.field_path, error.line) == ("subject", 4)
    assert "unknown filter 'nope'" in error.problem

    error = error_for('+++\nid = "welcome"\nsubject = "Hi"\npreheader = "{% if %}"\n+++\n' + BODY)
    assert (error.field_path, error.line) == ("preheader", 4)


def test_mjml_errors_say_so_and_quote_the_markup() -> None:
    error = error_for(
        front() + "<mjml><mj-body>\n<mj-section><mj-column><mj-text>x</mj-column>\n</mj-body></mjml>"
    )
    assert error.problem.startswith("MJML: ")


@pytest.mark.parametrize("tag", ["include", "render"])
def test_templates_cannot_include_other_files(tag: str) -> None:
    error = error_for(front() + "<mjml><mj-body>\n{% " + tag + " 'footer' %}</mj-body></mjml>")
    assert error.line == 6
    assert f"the '{tag}' tag is not available" in error.problem


def test_mjml_includes_cannot_read_files(tmp_path: Path) -> None:
    secret = tmp_path / "secret.mjml"
    secret.write_text("<mj-text>TOP SECRET</mj-text>")
    error = error_for(
        front() + f'<mjml><mj-body><mj-section><mj-column><mj-include path="{secret}" />'
        "</mj-column></mj-section></mj-body></mjml>"
    )
    assert "MJML" in error.problem
    assert "TOP SECRET" not in error.message


def test_a_file_that_is_not_utf8_or_missing_says_so(tmp_path: Path) -> None:
    path = tmp_path / "latin.mjml.liquid"
    path.write_bytes((front().replace("welcome", "latin") + "<mjml>caf\xe9</mjml>").encode("latin-1"))
    with pytest.raises(TemplateError, match="is not UTF-8"):
        load_template(path)
    with pytest.raises(TemplateError, match="cannot be read"):
        load_template(tmp_path / "gone.mjml.liquid")
