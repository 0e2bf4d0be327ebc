"""The architecture's one-way rules, checked on the source: nothing above the
ports imports a storage backend (only the server factory picks one), and the
domain imports no edge, store or transport."""

from __future__ import annotations

import ast
from pathlib import Path

SERVER = Path(__file__).parents[2] / "server" / "sendtime" / "server"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_only_the_server_factory_imports_a_backend() -> None:
    importers = sorted(
        str(path.relative_to(SERVER))
        for path in SERVER.rglob("*.py")
        if "store" not in path.relative_to(SERVER).parts
        and any(name.startswith("sendtime.server.store") for name in _imports(path))
    )
    assert importers == ["app.py"]


def test_the_domain_imports_no_edge_store_or_transport() -> None:
    banned = ("sendtime.server.store", "sendtime.server.edge", "grpc", "aiohttp", "sqlite3")
    offenders = {
        str(path.relative_to(SERVER)): sorted(n for n in _imports(path) if n.startswith(banned))
        for path in (SERVER / "domain").glob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}
