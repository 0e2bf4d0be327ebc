"""One reading of the Authorization header for every HTTP door."""

from __future__ import annotations

import base64

import pytest

from sendtime.server.domain.errors import Unauthenticated
from sendtime.server.edge.http_keys import header_key, names_a_key


def basic(user: str, password: str = "") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    ("header", "key"),
    [
        ("Bearer st_abc", "st_abc"),
        ("bearer  st_abc ", "st_abc"),
        ("Bearer", None),
        (basic("write-key"), "write-key"),  # Segment's libraries: the key as the user, no password
        (basic("admin-key", "ignored"), "admin-key"),
        (basic(""), None),
        ("Digest x", None),
        ("", None),
    ],
)
def test_the_key_of_a_header(header: str, key: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    assert header_key(headers) == key
    assert names_a_key(headers) == header.lower().startswith(("bearer", "basic"))


def test_basic_credentials_that_are_not_base64_are_refused() -> None:
    with pytest.raises(Unauthenticated, match="not valid base64"):
        header_key({"Authorization": "Basic !!!"})
