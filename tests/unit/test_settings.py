"""Settings: TOML file, SENDTIME_* overrides, and errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from sendtime.server.auth import Authenticator
from sendtime.server.domain.errors import PermissionDenied, Unauthenticated
from sendtime.server.settings import Scope, SettingsError, hash_key, load_settings


def test_defaults_are_what_make_run_serves() -> None:
    settings = load_settings(environ={})
    assert (settings.grpc.host, settings.grpc.port) == ("127.0.0.1", 50051)
    assert (settings.http.host, settings.http.port) == ("127.0.0.1", 8080)
    assert settings.auth.dev_key is True
    assert settings.storage.synchronous == "full"


def test_file_then_environment(tmp_path: Path) -> None:
    config = tmp_path / "sendtime.toml"
    config.write_text(
        '[grpc]\nport = 6000\n[storage]\ndata_dir = "/var/lib/sendtime"\n'
        '[[auth.keys]]\nname = "shop"\nhash = "' + hash_key("k") + '"\nscopes = ["ingest"]\n'
    )
    settings = load_settings(
        config, environ={"SENDTIME_GRPC__PORT": "7000", "SENDTIME_AUTH__DEV_KEY": "false"}
    )
    assert settings.grpc.port == 7000
    assert settings.storage.data_dir == Path("/var/lib/sendtime")
    assert settings.auth.dev_key is False
    assert settings.auth.keys[0].scopes == [Scope.INGEST]


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"SENDTIME_GRPC__PORT": "70000"}, "grpc.port"),
        ({"SENDTIME_GRPC__PORT": "fifty"}, "grpc.port"),
        ({"SENDTIME_STORAGE__SYNCHRONOUS": "sometimes"}, "storage.synchronous"),
        ({"SENDTIME_NOPE": "1"}, "nope"),
    ],
)
def test_bad_settings_name_the_setting(environ: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named.replace(".", r"\.")):
        load_settings(environ=environ)


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "absent.toml", environ={})
    broken = tmp_path / "broken.toml"
    broken.write_text("[grpc\n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(broken, environ={})


def test_api_keys_are_checked_by_hash_and_scope(tmp_path: Path) -> None:
    config = tmp_path / "keys.toml"
    config.write_text(
        "[auth]\ndev_key = false\n"
        '[[auth.keys]]\nname = "shop"\nhash = "' + hash_key("secret-1") + '"\nscopes = ["ingest"]\n'
    )
    auth = Authenticator(load_settings(config, environ={}).auth)
    assert auth.authorize("secret-1", Scope.INGEST).name == "shop"
    with pytest.raises(PermissionDenied, match="content"):
        auth.authorize("secret-1", Scope.CONTENT)
    with pytest.raises(Unauthenticated):
        auth.authorize("dev-key", Scope.INGEST)
    with pytest.raises(Unauthenticated):
        auth.authorize(None, Scope.INGEST)


def test_malformed_key_hash_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[[auth.keys]]\nname = "shop"\nhash = "md5:abc"\nscopes = ["ingest"]\n')
    with pytest.raises(SettingsError, match=r"auth\.keys\[shop\]\.hash"):
        load_settings(config, environ={})


@pytest.mark.parametrize("edge", ["GRPC", "HTTP"])
@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "shop-sendtime.internal"])  # noqa: S104  (settings only: nothing binds)
def test_the_dev_key_is_refused_on_an_edge_beyond_loopback(edge: str, host: str) -> None:
    with pytest.raises(SettingsError, match=rf"auth\.dev_key is on while {edge.lower()}\.host"):
        load_settings(environ={f"SENDTIME_{edge}__HOST": host})
    # with real keys it starts; forcing the dev key is possible, and said in the settings
    keys = {"SENDTIME_AUTH__DEV_KEY": "false"}
    assert load_settings(environ={f"SENDTIME_{edge}__HOST": host, **keys}).edges_beyond_loopback()
    forced = load_settings(
        environ={f"SENDTIME_{edge}__HOST": host, "SENDTIME_AUTH__DEV_KEY_BEYOND_LOOPBACK": "true"}
    )
    assert forced.auth.dev_key is True


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_edges_keep_the_dev_key(host: str) -> None:
    settings = load_settings(environ={"SENDTIME_GRPC__HOST": host, "SENDTIME_HTTP__HOST": host})
    assert settings.auth.dev_key is True
    assert settings.edges_beyond_loopback() == []
    assert settings.metrics_need_key() is False


def test_metrics_need_a_key_when_http_listens_beyond_loopback() -> None:
    exposed = {"SENDTIME_HTTP__HOST": "0.0.0.0", "SENDTIME_AUTH__DEV_KEY": "false"}  # noqa: S104
    assert load_settings(environ=exposed).metrics_need_key() is True
    said = {**exposed, "SENDTIME_METRICS__REQUIRE_ADMIN_KEY": "false"}
    assert load_settings(environ=said).metrics_need_key() is False  # said so in the config: followed
    assert load_settings(environ={"SENDTIME_METRICS__REQUIRE_ADMIN_KEY": "true"}).metrics_need_key() is True


def test_a_configured_key_turns_the_dev_key_off_so_the_edge_may_listen_beyond_loopback(
    tmp_path: Path,
) -> None:
    config = tmp_path / "keys.toml"
    config.write_text('[[auth.keys]]\nname = "shop"\nhash = "' + hash_key("k") + '"\nscopes = ["ingest"]\n')
    settings = load_settings(config, environ={"SENDTIME_HTTP__HOST": "0.0.0.0"})  # noqa: S104
    assert settings.auth.dev_key is True  # left on in the file, but no longer accepted
    assert not settings.dev_key_works()
