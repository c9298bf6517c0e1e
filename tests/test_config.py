"""Configuration: defaults, file, environment, secret files, checks with clear errors;
and the start-up failures an operator meets first."""

from __future__ import annotations

import pathlib

import pytest

from gateway.app import Gateway, StartupError
from gateway.config import Config, ConfigError, PbxConfig, load
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


# ---- PBXs: the flat keys, [[pbx]] tables, leases ------------------------------------------

TWO_PBXES = """
lease_seconds = 9
[agi]
allowed_peers = ["127.0.0.1"]

[[pbx]]
name = "pbx1"
ami_host = "10.0.0.11"
ami_port = 5039
ami_username = "gw1"
ami_secret = "first-Secret-1"
agi_peers = ["10.0.0.11", "10.0.0.12"]

[[pbx]]
name = "pbx2"
ami_host = "10.0.0.21"
ami_secret_file = "SECRET_FILE"
agi_peers = ["0:0::0:1", "10.0.0.11"]

[[pbx]]
name = "pbx3.cdr-only"
"""


def test_flat_keys_are_one_pbx_named_by_pbx_name():
    cfg = load(None, environ={})
    assert cfg.pbxes == (PbxConfig(name="default"),)
    assert cfg.lease_seconds == 6
    cfg = load(None, environ={"GATEWAY_PBX_NAME": "pbx1", "GATEWAY_AMI_HOST": "127.0.0.1",
                              "GATEWAY_AMI_PORT": "5040", "GATEWAY_AMI_SECRET": "flat-Secret",
                              "GATEWAY_LEASE_SECONDS": "3"})
    assert cfg.pbxes == (PbxConfig(name="pbx1", ami_host="127.0.0.1", ami_port=5040,
                                   ami_username="gateway", ami_secret="flat-Secret"),)
    assert cfg.lease_seconds == 3
    # the old flat attributes still read as before
    assert (cfg.ami_host, cfg.ami_port, cfg.ami_secret) == ("127.0.0.1", 5040, "flat-Secret")
    assert "flat-Secret" not in repr(cfg.public()) and "flat-Secret" in cfg.secret_values()
    # a Config built in code (tests, tools) has its PBX too
    assert Config(ami_host="h", ami_secret="s", pbx_name="x").pbxes[0].ami_host == "h"


def test_pbx_tables_from_the_file(tmp_path):
    secret = tmp_path / "pbx2-ami"
    secret.write_text("second-Secret-2\n")
    path = tmp_path / "gw.toml"
    path.write_text(TWO_PBXES.replace("SECRET_FILE", str(secret)))
    cfg = load(path, environ={"GATEWAY_PBX": "ignored: tables come from the file"})
    assert [p.name for p in cfg.pbxes] == ["pbx1", "pbx2", "pbx3.cdr-only"]
    one, two, three = cfg.pbxes
    assert one == PbxConfig(name="pbx1", ami_host="10.0.0.11", ami_port=5039,
                            ami_username="gw1", ami_secret="first-Secret-1",
                            agi_peers=("10.0.0.11", "10.0.0.12"))
    assert (two.ami_port, two.ami_username, two.ami_secret) == (5038, "gateway",
                                                                "second-Secret-2")
    assert two.agi_peers == ("::1", "10.0.0.11")  # one spelling per address
    assert (three.ami_host, three.ami_secret, three.agi_peers) == ("", "", ())
    assert cfg.lease_seconds == 9
    assert cfg.ami_host == "" and cfg.pbx_name == "default"
    # the AGI listener lets every PBX's peers in, besides agi_allowed_peers, each once
    assert cfg.all_agi_peers() == ("127.0.0.1", "10.0.0.11", "10.0.0.12", "::1")
    # secrets: masked in the public view, all known to the log redactor
    public = cfg.public()
    assert "first-Secret-1" not in repr(public) and "second-Secret-2" not in repr(public)
    assert [p["ami_secret"] for p in public["pbx"]] == ["***", "***", ""]
    assert public["pbx"][0]["agi_peers"] == ["10.0.0.11", "10.0.0.12"]
    assert {"first-Secret-1", "second-Secret-2"} <= set(cfg.secret_values())
    assert "first-Secret-1" not in repr(cfg) and "second-Secret-2" not in repr(cfg.pbxes)


def test_an_open_agi_listener_stays_open():
    cfg = Config(agi_allowed_peers=(), pbx=(PbxConfig(name="a", agi_peers=("10.0.0.1",)),))
    assert cfg.all_agi_peers() == ()  # empty: anyone may connect, as before
    assert Config().all_agi_peers() == ("127.0.0.1", "::1")


def pbx_toml(*tables: str, top: str = "") -> str:
    return top + "".join(f"[[pbx]]\n{t}\n" for t in tables)


@pytest.mark.parametrize(
    "text, message",
    [
        (pbx_toml('name = "a b"'), "pbx[0].name: 'a b' is not a PBX name"),
        (pbx_toml('name = ""'), "pbx[0].name: '' is not a PBX name"),
        (pbx_toml(f'name = "{"x" * 65}"'), "pbx[0].name"),
        (pbx_toml('ami_host = "h"\nami_secret = "s"'), "pbx[0].name: every [[pbx]] needs"),
        (pbx_toml('name = "a"', 'name = "b"', 'name = "a"'),
         "pbx[2] (a).name: 'a' is given to two [[pbx]] tables"),
        (pbx_toml('name = "a"', top='ami_host = "10.0.0.1"\nami_secret = "s"\n'),
         "ami_host: the flat ami_* keys configure one PBX"),
        (pbx_toml('name = "a"', top='pbx_name = "b"\n'), "pbx_name: names the PBX"),
        (pbx_toml('name = "a"\nami_port = 70000'), "pbx[0] (a).ami_port: 70000 is not a TCP"),
        (pbx_toml('name = "a"\nami_port = 0'), "pbx[0] (a).ami_port: 0 is not a TCP port"),
        (pbx_toml('name = "a"\nami_port = "x"'), "pbx[0] (a).ami_port: cannot read 'x'"),
        (pbx_toml('name = "a"\nami_host = "h"'), "pbx[0] (a).ami_secret: required"),
        (pbx_toml('name = "a"\nami_secret_file = "/nonexistent/secret"'),
         "pbx[0] (a).ami_secret_file: /nonexistent/secret: No such file"),
        (pbx_toml('name = "a"\nami_secret = "s"\nami_secret_file = "/etc/hostname"'),
         "pbx[0] (a): give ami_secret or ami_secret_file, not both"),
        (pbx_toml('name = "a"', 'name = "b"\nagi_peers = ["10.0.0.0/8"]'),
         "pbx[1] (b).agi_peers: '10.0.0.0/8' is not an IP address"),
        (pbx_toml('name = "a"\nagi_peers = ["pbx.example"]'),
         "pbx[0] (a).agi_peers: 'pbx.example' is not an IP address"),
        (pbx_toml('name = "a"\nami_hots = "h"'), "pbx[0] (a): unknown keys ami_hots"),
        ("pbx = [1, 2]\n", "pbx: must be an array of tables"),
        ("lease_seconds = 2\n", "lease_seconds must be at least 3"),
        ('pbx_name = "no/slash"\n', "pbx_name: 'no/slash' is not a PBX name"),
    ],
)
def test_bad_pbx_configuration_is_a_clear_error(tmp_path, text, message):
    path = tmp_path / "gw.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load(path, environ={})
    assert message in str(e.value)


def test_a_bad_pbx_secret_is_never_echoed(tmp_path):
    path = tmp_path / "gw.toml"
    path.write_text(pbx_toml('name = "a"\nami_host = "h"\nami_secret = 123456789'))
    with pytest.raises(ConfigError) as e:
        load(path, environ={})
    assert "pbx[0] (a).ami_secret" in str(e.value) and "123456789" not in str(e.value)


def test_the_example_files_two_pbxs_work_as_its_comment_says(tmp_path):
    """gateway.example.toml shows two [[pbx]] tables, commented: replacing its
    ``pbx = []`` with them, uncommented, gives a configuration that loads."""
    text = (pathlib.Path(__file__).parent.parent / "gateway.example.toml").read_text()
    lines = text.splitlines()
    end = lines.index("pbx = []")
    start = next(i for i in range(end) if lines[i].startswith("#   [[pbx]]"))
    tables = [line[4:] if line.startswith("#   ") else "" for line in lines[start:end]]
    assert all(line.startswith("#") for line in lines[start:end])
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for name, secret in (("pbx1", "one-secret"), ("pbx2", "two-secret")):
        (secrets / f"{name}-ami").write_text(secret + "\n")
    body = "\n".join(tables).replace("/run/secrets/", f"{secrets}/")
    path = tmp_path / "gw.toml"
    path.write_text("\n".join(lines[:end] + [body] + lines[end + 1:]) + "\n")
    cfg = load(path, environ={})
    assert [p.name for p in cfg.pbxes] == ["pbx1", "pbx2"]
    assert [p.ami_secret for p in cfg.pbxes] == ["one-secret", "two-secret"]
    assert [p.agi_peers for p in cfg.pbxes] == [("10.0.0.11",), ("10.0.0.12",)]
    assert {p.ami_host for p in cfg.pbxes} == {"10.0.0.11", "10.0.0.12"}
    # the keys after the tables are still the file's own, not swallowed by a table
    assert (cfg.admin_token, cfg.read_token, cfg.http_port) == ("", "", 8080)


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"GATEWAY_PBX_NAME": "two words"}, "pbx_name"),
        ({"GATEWAY_LEASE_SECONDS": "1"}, "lease_seconds"),
        ({"GATEWAY_LEASE_SECONDS": "six"}, "lease_seconds"),
    ],
)
def test_bad_pbx_environment_is_a_clear_error(environ, message):
    with pytest.raises(ConfigError) as e:
        load(None, environ=environ)
    assert message in str(e.value)


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
