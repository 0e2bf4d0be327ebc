"""Audit the pinned dependencies (constraints.txt) for known vulnerabilities.

    python tools/audit.py                          # exit 1 on a known-vulnerable pin
    python tools/audit.py --degrade-when-offline   # CI: exit 0, saying so, when PyPI is unreachable

The data is PyPI's own: the ``vulnerabilities`` of a release in PyPI's JSON API
(advisories from the PyPA advisory database and OSV, the same data pip-audit's
PyPI service reads). For each pin it asks for the release
(``/pypi/NAME/VERSION/json``); where that answers 404 (as through this
machine's package proxy, which serves project pages only) it asks for the
project (``/pypi/NAME/json``), whose vulnerabilities are those of the latest
release: exact for a pin that is the latest release, and for an older pin the
pin is reported "not covered" rather than guessed at. pip-audit itself cannot
be used here: it reads the release pages only, and reports every package as
"not found on PyPI".

A known vulnerability fails the run unless ops/audit-allowlist.toml names it,
with the package and a reason (an entry without a reason is itself an error):

    [[allow]]
    id = "GHSA-xxxx-xxxx-xxxx"     # or PYSEC-/CVE- id: any of the advisory's aliases
    package = "somepackage"
    reason = "why it does not apply to sendtime, or what waits for the fix"

Exit status: 0 nothing known-vulnerable (pins not covered are listed); 1 a
known-vulnerable pin; 2 the audit could not run (bad allowlist, or PyPI
unreachable without --degrade-when-offline).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_INDEX = "https://pypi.org/pypi"
_PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)")


@dataclass(frozen=True)
class Pin:
    name: str
    version: str

    @property
    def key(self) -> str:
        """The normalised project name (PEP 503)."""
        return re.sub(r"[-_.]+", "-", self.name).lower()


@dataclass(frozen=True)
class Vulnerability:
    id: str
    aliases: tuple[str, ...]
    fixed_in: tuple[str, ...]
    summary: str
    link: str

    @property
    def ids(self) -> frozenset[str]:
        return frozenset((self.id, *self.aliases))


@dataclass
class Checked:
    pin: Pin
    #: None: not covered (``why`` says why).
    vulnerabilities: list[Vulnerability] | None
    why: str = ""
    unreachable: bool = False


@dataclass(frozen=True)
class Allowed:
    id: str
    package: str
    reason: str


@dataclass
class Report:
    checked: list[Checked]
    allowed: list[Allowed]
    findings: list[tuple[Pin, Vulnerability]] = field(default_factory=list)
    waived: list[tuple[Pin, Vulnerability, Allowed]] = field(default_factory=list)


class AuditError(Exception):
    """The audit cannot run (its message says why)."""


def read_pins(path: Path) -> list[Pin]:
    pins = []
    for line in path.read_text().splitlines():
        match = _PIN.match(line)
        if match:
            pins.append(Pin(match[1], match[2]))
    if not pins:
        raise AuditError(f"{path} pins nothing (name==version lines)")
    return pins


def read_allowlist(path: Path) -> list[Allowed]:
    if not path.exists():
        return []
    try:
        entries = tomllib.loads(path.read_text()).get("allow", [])
    except tomllib.TOMLDecodeError as exc:
        raise AuditError(f"{path} is not valid TOML: {exc}") from None
    allowed = []
    for number, entry in enumerate(entries, 1):
        missing = [k for k in ("id", "package", "reason") if not str(entry.get(k, "")).strip()]
        if missing:
            raise AuditError(
                f"{path}: allow entry {number} has no {', '.join(missing)}; each needs all three"
            )
        allowed.append(Allowed(str(entry["id"]), str(entry["package"]), str(entry["reason"])))
    return allowed


def _get_json(url: str, timeout_s: float) -> Any | None:
    """The JSON at ``url``, or None when it answers 404."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310 (https or a test's loopback)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            return json.load(response)
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        raise


def _vulnerabilities(entries: Iterable[dict[str, Any]]) -> list[Vulnerability]:
    return [
        Vulnerability(
            id=str(entry.get("id", "")),
            aliases=tuple(entry.get("aliases") or ()),
            fixed_in=tuple(entry.get("fixed_in") or ()),
            summary=str(entry.get("summary") or entry.get("details") or "")[:200],
            link=str(entry.get("link") or ""),
        )
        for entry in entries
        if not entry.get("withdrawn")
    ]


def check(pin: Pin, index: str, timeout_s: float) -> Checked:
    for attempt in range(2):  # one retry: a dropped connection is not a finding
        try:
            release = _get_json(f"{index}/{pin.key}/{pin.version}/json", timeout_s)
            if release is not None:
                return Checked(pin, _vulnerabilities(release.get("vulnerabilities", [])))
            project = _get_json(f"{index}/{pin.key}/json", timeout_s)
            if project is None:
                return Checked(pin, None, f"{index} knows no project {pin.key!r}")
            latest = str(project.get("info", {}).get("version", ""))
            if latest == pin.version:
                return Checked(pin, _vulnerabilities(project.get("vulnerabilities", [])))
            return Checked(
                pin,
                None,
                f"the index answers per-release data only for the latest release ({latest});"
                f" {pin.version} is older",
            )
        except (urllib.error.URLError, OSError, ValueError) as error:
            if attempt:
                return Checked(pin, None, f"cannot reach {index}: {error}", unreachable=True)
    raise AssertionError("unreachable")


def audit(pins: Sequence[Pin], allowed: Sequence[Allowed], index: str, timeout_s: float) -> Report:
    with ThreadPoolExecutor(max_workers=16) as pool:
        checked = list(pool.map(lambda pin: check(pin, index, timeout_s), pins))
    report = Report(checked, list(allowed))
    for item in checked:
        for vulnerability in item.vulnerabilities or ():
            waiver = next(
                (a for a in allowed if a.id in vulnerability.ids and Pin(a.package, "").key == item.pin.key),
                None,
            )
            if waiver is None:
                report.findings.append((item.pin, vulnerability))
            else:
                report.waived.append((item.pin, vulnerability, waiver))
    return report


def print_report(report: Report, out: Any) -> None:
    covered = [c for c in report.checked if c.vulnerabilities is not None]
    uncovered = [c for c in report.checked if c.vulnerabilities is None]
    print(
        f"audit: {len(covered)} of {len(report.checked)} pins checked against PyPI's vulnerability data",
        file=out,
    )
    for item in uncovered:
        print(f"  not covered: {item.pin.name}=={item.pin.version}: {item.why}", file=out)
    for pin, vulnerability, waiver in report.waived:
        print(f"  allowed: {pin.name}=={pin.version} {vulnerability.id}: {waiver.reason}", file=out)
    for pin, vulnerability in report.findings:
        fixed = ", ".join(vulnerability.fixed_in) or "no fixed release yet"
        aliases = f" ({', '.join(vulnerability.aliases)})" if vulnerability.aliases else ""
        print(
            f"  VULNERABLE: {pin.name}=={pin.version} {vulnerability.id}{aliases}: fixed in {fixed};"
            f" {vulnerability.summary} {vulnerability.link}".rstrip(),
            file=out,
        )
    if not report.findings:
        print("audit: no known vulnerability in the pins checked", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--constraints", type=Path, default=ROOT / "constraints.txt")
    parser.add_argument("--allowlist", type=Path, default=ROOT / "ops" / "audit-allowlist.toml")
    parser.add_argument("--index", default=DEFAULT_INDEX, help="PyPI's JSON API root (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds per request")
    parser.add_argument(
        "--degrade-when-offline",
        action="store_true",
        help="exit 0, saying the audit did not run, when the index cannot be reached at all",
    )
    args = parser.parse_args(argv)
    try:
        pins = read_pins(args.constraints)
        allowed = read_allowlist(args.allowlist)
    except (AuditError, OSError) as error:
        print(f"audit: cannot run: {error}", file=sys.stderr)
        return 2
    report = audit(pins, allowed, args.index.rstrip("/"), args.timeout)
    if all(item.unreachable for item in report.checked):
        reason = report.checked[0].why
        if args.degrade_when_offline:
            print(
                f"audit: COULD NOT RUN, nothing was checked ({reason}); not failing the run", file=sys.stderr
            )
            return 0
        print(f"audit: cannot run: {reason}", file=sys.stderr)
        return 2
    print_report(report, sys.stdout)
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())
