"""The SES relay's SigV4 signer against AWS's published Signature Version 4 test
suite (aws-sig-v4-test-suite: credentials AKIDEXAMPLE, 2015-08-30T12:36:00Z,
us-east-1, service "service")."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from yarl import URL

from sendtime.server.relay._sigv4 import host_header, sign

SUITE = {
    "region": "us-east-1",
    "service": "service",
    "access_key_id": "AKIDEXAMPLE",
    "secret_access_key": "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
    "now": datetime(2015, 8, 30, 12, 36, 0, tzinfo=UTC),
}


def test_get_vanilla() -> None:
    headers = sign(method="GET", url=URL("https://example.amazonaws.com/"), headers={}, body=b"", **SUITE)  # type: ignore[arg-type]
    assert headers["X-Amz-Date"] == "20150830T123600Z"
    assert headers["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
        "SignedHeaders=host;x-amz-date, "
        "Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
    )


def test_post_x_www_form_urlencoded() -> None:
    body = b"Param1=value1"
    assert (
        hashlib.sha256(body).hexdigest() == "9095672bbd1f56dfc5b65f3e153adc8731a4a654192329106275f4c7b24d0b6e"
    )
    headers = sign(
        method="POST",
        url=URL("https://example.amazonaws.com/"),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        body=body,
        **SUITE,  # type: ignore[arg-type]
    )
    assert headers["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
        "SignedHeaders=content-type;host;x-amz-date, "
        "Signature=ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a"
    )


def test_a_session_token_is_sent_and_signed() -> None:
    headers = sign(
        method="GET",
        url=URL("https://example.amazonaws.com/"),
        headers={},
        body=b"",
        session_token="TOKEN",
        **SUITE,  # type: ignore[arg-type]
    )
    assert headers["X-Amz-Security-Token"] == "TOKEN"
    assert "SignedHeaders=host;x-amz-date;x-amz-security-token," in headers["Authorization"]


def test_host_header_keeps_only_a_non_default_port() -> None:
    assert host_header(URL("https://email.eu-west-1.amazonaws.com/v2/email/outbound-emails")) == (
        "email.eu-west-1.amazonaws.com"
    )
    assert host_header(URL("https://example.com:443/")) == "example.com"
    assert host_header(URL("http://127.0.0.1:8443/x")) == "127.0.0.1:8443"
