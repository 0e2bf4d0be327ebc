"""tools/audit.py against a real HTTP server on 127.0.0.1:0 that answers the
way PyPI's JSON API does (and the way this machine's proxy of it does: project
pages only, 404 for release pages)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: requests 2.19.0's real advisory (CVE-2018-18074), as PyPI lists it.
REQUESTS_ADVISORY = {
    "id": "PYSEC-2018-28",
    "aliases": ["CVE-2018-18074", "GHSA-x84v-xcm2-53pg"],
    "details": "The Requests package sends an HTTP Authorization header to an http URI upon a redirect.",
    "fixed_in": ["2.20.0"],
    "link": "https://osv.dev/vulnerability/PYSEC-2018-28",
    "source": "osv",
    "withdrawn": None,
}

#: name -> (latest version, its vulnerabilities); release pages: name/version -> vulnerabilities.
PROJECTS: dict[str, tuple[str, list[dict[str, Any]]]] = {
    "requests": ("2.19.0", [REQUESTS_ADVISORY]),
    "msgspec": ("0.23.0", []),
    "aiohttp": ("3.14.5", []),
}
RELEASES: dict[str, list[dict[str, Any]]] = {
    "urllib3/1.24.1": [{**REQUESTS_ADVISORY, "id": "PYSEC-2019-132"}]
}


class _PyPI(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        parts = self.path.strip("/").split("/")  # pypi/NAME/json or pypi/NAME/VERSION/json
        body: Any = None
        if len(parts) == 4 and f"{parts[1]}/{parts[2]}" in RELEASES:
            body = {"info": {"version": parts[2]}, "vulnerabilities": RELEASES[f"{parts[1]}/{parts[2]}"]}
        elif len(parts) == 3 and parts[1] in PROJECTS:
            latest, vulnerabilities = PROJECTS[parts[1]]
            body = {"info": {"version": latest}, "vulnerabilities": vulnerabilities}
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def index() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PyPI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/pypi"
    server.shutdown()
    server.server_close()


def _audit(
    tmp_path: Path, index: str, pins: str, allowlist: str = "", *extra: str
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "constraints.txt").write_text(pins)
    (tmp_path / "allow.toml").write_text(allowlist)
    command = [
        sys.executable, str(ROOT / "tools" / "audit.py"), "--index", index, "--timeout", "5",
        "--constraints", str(tmp_path / "constraints.txt"), "--allowlist", str(tmp_path / "allow.toml"), *extra,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_a_known_vulnerable_pin_fails_the_audit(tmp_path: Path, index: str) -> None:
    result = _audit(tmp_path, index, "requests==2.19.0\naiohttp==3.14.5\n")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "VULNERABLE: requests==2.19.0 PYSEC-2018-28 (CVE-2018-18074, GHSA-x84v-xcm2-53pg)" in result.stdout
    assert "fixed in 2.20.0" in result.stdout
    assert "2 of 2 pins checked" in result.stdout


def test_a_release_page_is_read_where_the_index_has_one(tmp_path: Path, index: str) -> None:
    result = _audit(tmp_path, index, "urllib3==1.24.1\n")
    assert result.returncode == 1
    assert "VULNERABLE: urllib3==1.24.1 PYSEC-2019-132" in result.stdout


def test_an_older_pin_the_index_has_no_release_page_for_is_reported_not_covered(
    tmp_path: Path, index: str
) -> None:
    result = _audit(tmp_path, index, "msgspec==0.22.0\naiohttp==3.14.5\n")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 of 2 pins checked" in result.stdout
    assert (
        "not covered: msgspec==0.22.0: the index answers per-release data only for the latest release (0.23.0)"
        in (result.stdout)
    )


def test_an_allowlisted_advisory_passes_with_its_reason_shown(tmp_path: Path, index: str) -> None:
    allow = '[[allow]]\nid = "CVE-2018-18074"\npackage = "Requests"\nreason = "no redirects are followed"\n'
    result = _audit(tmp_path, index, "requests==2.19.0\n", allow)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "allowed: requests==2.19.0 PYSEC-2018-28: no redirects are followed" in result.stdout


def test_an_allowlist_entry_without_a_reason_stops_the_audit(tmp_path: Path, index: str) -> None:
    allow = '[[allow]]\nid = "CVE-2018-18074"\npackage = "requests"\n'
    result = _audit(tmp_path, index, "requests==2.19.0\n", allow)
    assert result.returncode == 2
    assert "allow entry 1 has no reason" in result.stderr


def test_an_unreachable_index_fails_unless_told_to_degrade(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}/pypi"
    result = _audit(tmp_path, closed, "aiohttp==3.14.5\n")
    assert result.returncode == 2
    assert "cannot reach" in result.stderr
    result = _audit(tmp_path, closed, "aiohttp==3.14.5\n", "", "--degrade-when-offline")
    assert result.returncode == 0
    assert "COULD NOT RUN, nothing was checked" in result.stderr
