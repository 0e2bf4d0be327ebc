"""Files the server reads, whatever folder it is started in: relative paths in
a config file are relative to the file's folder, the templates and the demo
catalog ship with sendtime, and a configured path that does not exist stops
the start with its name. Real ``sendtime serve`` processes, started outside the
checkout, and real CLI processes."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path

import pytest

from sendtime.server.settings import load_settings
from tests.integration.server_process import run_sendtime, start_server

# slow: servers run as processes from other folders (make test-fast leaves them out)
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_relative_paths_in_a_config_file_are_relative_to_its_folder(tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    config = folder / "sendtime.toml"
    config.write_text(
        '[storage]\ndata_dir = "data"\n'
        '[content]\ntemplates_dir = "../mail/templates"\ncatalog_file = "/srv/catalog.json"\n'
        '[grpc.tls]\ncert_file = "tls/cert.pem"\nkey_file = "tls/key.pem"\n'
        '[delivery.relay]\nkind = "outbox"\ndirectory = "outbox"\n'
    )
    settings = load_settings(config, environ={"SENDTIME_HTTP__TLS__CERT_FILE": "env.pem"} | _http_key())
    assert settings.storage.data_dir == folder / "data"
    assert settings.content.templates_dir == tmp_path / "mail" / "templates"
    assert settings.content.catalog_file == Path("/srv/catalog.json")  # absolute: as given
    assert settings.grpc.tls is not None
    assert (settings.grpc.tls.cert_file, settings.grpc.tls.key_file) == (
        folder / "tls/cert.pem",
        folder / "tls/key.pem",
    )
    # an environment variable's path is the working folder's, as a shell user means it
    assert settings.http.tls is not None
    assert settings.http.tls.cert_file == Path("env.pem")
    # the outbox keeps its rule: a relative folder lives in the data folder
    assert getattr(settings.delivery.relay, "directory", None) == Path("outbox")


def _http_key() -> dict[str, str]:
    return {"SENDTIME_HTTP__TLS__KEY_FILE": "env.key"}


async def test_serve_started_outside_the_checkout_renders_emails(tmp_path: Path) -> None:
    server = await start_server(None, cwd=tmp_path)  # no config: the shipped templates and catalog
    try:
        code, out, err = await run_sendtime("demo-data", "--target", server.target, cwd=tmp_path)
        assert code == 0, err
        code, out, err = await run_sendtime(
            "render", "abandoned_cart", "--user", "demo-shopper", "--target", server.target, cwd=tmp_path
        )
        assert code == 0, err
        assert "you left something in your cart" in out
        assert "Gooseneck Kettle, Brushed Steel" in out  # a product of the shipped demo catalog
    finally:
        server.terminate()
        await server.wait()


async def test_a_config_next_to_its_templates_is_found_from_anywhere(tmp_path: Path) -> None:
    site = tmp_path / "site"
    shutil.copytree(REPO / "templates", site / "templates")
    text = (site / "templates" / "post_purchase.mjml.liquid").read_text()
    (site / "templates" / "post_purchase.mjml.liquid").write_text(
        text.replace('subject = "', 'subject = "[our own] ', 1)
    )
    (site / "sendtime.toml").write_text('[content]\ntemplates_dir = "templates"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    server = await start_server(None, config=site / "sendtime.toml", cwd=elsewhere)
    try:
        code, _, err = await run_sendtime("demo-data", "--target", server.target, cwd=elsewhere)
        assert code == 0, err
        code, out, err = await run_sendtime(
            "render", "post_purchase", "--user", "demo-buyer", "--target", server.target, cwd=elsewhere
        )
        assert code == 0, err
        assert "[our own]" in out
    finally:
        server.terminate()
        await server.wait()


async def test_a_configured_path_that_does_not_exist_stops_the_start_naming_it(tmp_path: Path) -> None:
    for setting, value in (("templates_dir", "no-templates"), ("catalog_file", "no-catalog.json")):
        config = tmp_path / f"{setting}.toml"
        config.write_text(f'[content]\n{setting} = "{value}"\n')
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sendtime.server",
            "serve",
            "--config",
            str(config),
            env={k: v for k, v in os.environ.items() if not k.startswith("SENDTIME_")}
            | {
                "SENDTIME_GRPC__PORT": "0",
                "SENDTIME_HTTP__PORT": "0",
                "SENDTIME_STORAGE__DATA_DIR": str(tmp_path / "data"),
            },
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 1, (setting, out, err)
        assert f"content.{setting} {tmp_path / value}" in err.decode(), err
        assert b"sendtime serving" not in out
