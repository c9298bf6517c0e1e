"""Configuration: defaults, file, environment, secret files, checks with clear errors;
and the start-up failures an operator meets first."""

from __future__ import annotations

import pytest

from gateway.app import Gateway, StartupError
from gateway.config import Config, ConfigError, load
from tests.support.pbx import free_port


def test_defaults_then_file_then_environment(tmp_path):
    path = tmp_path / "gw.toml"
    path.write_text('agi_port = 4600\nslice_seconds = 120\n[http]\nport = 9000\n')
    cfg = load(path, environ={"GATEWAY_AGI_PORT": "4700"})
    assert (cfg.agi_port, cfg.slice_seconds, cfg.http_port) == (4700, 120, 9000)
    assert cfg.ami_port == Config().ami_port


def test_secrets_from_files_and_masked(tmp_path):
    secret = tmp_path / "ami"
    secret.write_text("s3cr3t-value\n")
    cfg = load(None, environ={"GATEWAY_AMI_HOST": "127.0.0.1",
                              "GATEWAY_AMI_SECRET_FILE": str(secret),
                              "GATEWAY_DATABASE_URL": "postgresql://gw:pw123@db:5432/gw",
                              "GATEWAY_ADMIN_TOKEN": "tok-abc"})
    assert cfg.ami_secret == "s3cr3t-value"
    public = repr(cfg.public())
    for leaked in ("s3cr3t-value", "pw123", "tok-abc"):
        assert leaked not in public
    assert cfg.public()["database_url"] == "postgresql://gw:***@db:5432/gw"


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"GATEWAY_AGI_PORT": "http"}, "agi_port"),
        ({"GATEWAY_HTTP_PORT": "70000"}, "http_port"),
        ({"GATEWAY_DATABASE_URL": "mysql://x@y/z"}, "database_url"),
        ({"GATEWAY_AMI_HOST": "127.0.0.1"}, "ami_secret"),
        ({"GATEWAY_AGI_ALLOWED_PEERS": "10.0.0.0/8,not-an-ip"}, "agi_allowed_peers"),
        ({"GATEWAY_SLICE_SECONDS": "0"}, "slice_seconds"),
        ({"GATEWAY_LOG_FORMAT": "xml"}, "log_format"),
        ({"GATEWAY_AMI_SECRET_FILE": "/nonexistent/secret"}, "GATEWAY_AMI_SECRET_FILE"),
    ],
)
def test_bad_values_are_clear_errors(environ, message):
    with pytest.raises(ConfigError) as e:
        load(None, environ=environ)
    assert message in str(e.value)


def test_bad_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("agi_prot = 1\n")
    with pytest.raises(ConfigError, match="unknown keys agi_prot"):
        load(bad, environ={})
    bad.write_text("agi_port = \n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load(bad, environ={})
    with pytest.raises(ConfigError, match="missing.toml"):
        load(tmp_path / "missing.toml", environ={})


async def test_unreachable_database_is_a_clear_startup_error():
    port = free_port()
    gw = Gateway(Config(database_url=f"postgresql://postgres@127.0.0.1:{port}/nope",
                        agi_port=0, http_port=0), configure_logs=False)
    with pytest.raises(StartupError) as e:
        await gw.start()
    await gw.stop()
    assert str(e.value).startswith("database: cannot connect to postgresql://postgres@127.0.0.1")


async def test_busy_agi_port_is_a_clear_startup_error(database_url):
    import asyncio

    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = blocker.sockets[0].getsockname()[1]
    gw = Gateway(Config(database_url=database_url, agi_port=port, http_port=0),
                 configure_logs=False)
    try:
        with pytest.raises(StartupError, match=f"agi: cannot listen on 127.0.0.1:{port}"):
            await gw.start()
    finally:
        await gw.stop()
        blocker.close()
