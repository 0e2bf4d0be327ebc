"""AWS Signature Version 4 for one request, as the AWS General Reference
describes it (canonical request, string to sign, derived key, signature).

Small and checked against AWS's published test suite vectors (get-vanilla,
post-x-www-form-urlencoded) in tests/unit/test_relay_sigv4.py, which is why it
is here rather than a dependency on botocore for one POST.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Final
from urllib.parse import quote

from yarl import URL

ALGORITHM: Final = "AWS4-HMAC-SHA256"


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def host_header(url: URL) -> str:
    """The Host header value for ``url``: the port only when it is not the default."""
    host = url.raw_host or ""
    if url.port is not None and not url.is_default_port():
        return f"{host}:{url.port}"
    return host


def _canonical_query(url: URL) -> str:
    pairs = sorted((quote(key, safe="-_.~"), quote(value, safe="-_.~")) for key, value in url.query.items())
    return "&".join(f"{key}={value}" for key, value in pairs)


def sign(
    *,
    method: str,
    url: URL,
    headers: Mapping[str, str],
    body: bytes,
    region: str,
    service: str,
    access_key_id: str,
    secret_access_key: str,
    session_token: str = "",
    now: datetime | None = None,
) -> dict[str, str]:
    """The headers to add to the request: X-Amz-Date, X-Amz-Security-Token (with
    a session token) and Authorization. ``headers`` are the ones to sign besides
    Host and X-Amz-Date; the caller must send Host as ``host_header(url)``."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    amz_date = moment.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]

    added = {"X-Amz-Date": amz_date}
    if session_token:
        added["X-Amz-Security-Token"] = session_token
    signed: dict[str, str] = {}
    for name, value in {**headers, "Host": host_header(url), **added}.items():
        signed[name.lower()] = " ".join(value.split())
    names = sorted(signed)
    signed_headers = ";".join(names)

    canonical_request = "\n".join(
        [
            method.upper(),
            # the path as sent (already escaped) escaped once more, as for every
            # service but S3
            quote(url.raw_path or "/", safe="/~"),
            _canonical_query(url),
            "".join(f"{name}:{signed[name]}\n" for name in names),
            signed_headers,
            hashlib.sha256(body).hexdigest(),
        ]
    )
    scope = f"{day}/{region}/{service}/aws4_request"
    string_to_sign = "\n".join(
        [ALGORITHM, amz_date, scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
    )
    key = _hmac(("AWS4" + secret_access_key).encode(), day)
    for part in (region, service, "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    added["Authorization"] = (
        f"{ALGORITHM} Credential={access_key_id}/{scope}, SignedHeaders={signed_headers}, Signature={signature}"
    )
    return added
