"""No secret, however it is given, appears in errors, logs, /status or /metrics; the
standard library's logging goes out as structured lines; repeated warnings are limited."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import aiohttp
import pytest
import structlog

from gateway import logs
from gateway.app import Gateway, StartupError
from gateway.config import Config, ConfigError, load

URL_PASSWORD = "Url-Pass-7731"
QUERY_PASSWORD = "Query-Pass-4402"
AMI_SECRET = "Ami-Secret-9910"
ADMIN_TOKEN = "Admin-Token-3318"
READ_TOKEN = "Read-Token-6604"
ALL = (URL_PASSWORD, QUERY_PASSWORD, AMI_SECRET, ADMIN_TOKEN, READ_TOKEN)


def _with_passwords(url: str) -> str:
    scheme, _, rest = url.partition("://")
    user, _, host = rest.partition("@")
    return f"{scheme}://{user}:{URL_PASSWORD}@{host}?password={QUERY_PASSWORD}"


@pytest.fixture(autouse=True)
def _restore_logging():
    yield
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler).__name__ == "_StructlogHandler":
            root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    structlog.reset_defaults()


# ---- configuration errors and the masked view -----------------------------------------------


@pytest.mark.parametrize("url, shown", [
    (f"postgresql://gw:{URL_PASSWORD}@db:5432/gw", "postgresql://gw:***@db:5432/gw"),
    (f"postgresql://gw@db:5432/gw?password={QUERY_PASSWORD}",
     "postgresql://gw@db:5432/gw?password=***"),
    (f"postgresql://gw:{URL_PASSWORD}@db/gw?sslmode=require&password={QUERY_PASSWORD}",
     "postgresql://gw:***@db/gw?sslmode=require&password=***"),
])
def test_database_url_is_masked_however_the_password_is_given(url, shown):
    cfg = load(None, environ={"GATEWAY_DATABASE_URL": url})
    assert cfg.public()["database_url"] == shown
    assert set(cfg.secret_values()) >= {p for p in (URL_PASSWORD, QUERY_PASSWORD) if p in url}


@pytest.mark.parametrize("toml, key", [
    ('admin_token = 123456789\n', "admin_token"),
    (f'database_url = ["postgresql://gw:{URL_PASSWORD}@db/gw"]\n', "database_url"),
    (f'ami_secret = ["{AMI_SECRET}"]\n', "ami_secret"),
    (f'read_token = {{ value = "{READ_TOKEN}" }}\n', "read"),
])
def test_type_errors_on_secrets_do_not_echo_them(tmp_path, toml, key):
    path = tmp_path / "gw.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load(path, environ={})
    message = str(e.value)
    assert key in message
    for secret in (*ALL, "123456789"):
        assert secret not in message
    assert e.value.__cause__ is None  # the chained error would print the value


def test_secrets_from_environment_files_and_toml_are_all_masked(tmp_path):
    secret_file = tmp_path / "ami"
    secret_file.write_text(AMI_SECRET + "\n")
    path = tmp_path / "gw.toml"
    path.write_text(f'admin_token = "{ADMIN_TOKEN}"\n')
    cfg = load(path, environ={
        "GATEWAY_DATABASE_URL": f"postgresql://gw:{URL_PASSWORD}@db/gw?password={QUERY_PASSWORD}",
        "GATEWAY_AMI_HOST": "127.0.0.1", "GATEWAY_AMI_SECRET_FILE": str(secret_file),
        "GATEWAY_READ_TOKEN": READ_TOKEN})
    shown = json.dumps(cfg.public())
    for secret in ALL:
        assert secret not in shown
        assert secret in cfg.secret_values()


# ---- logs ----------------------------------------------------------------------------------


def _lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_redactor_scrubs_secrets_from_events_and_tracebacks():
    stream = io.StringIO()
    logs.configure("json", "info", stream=stream, secrets=ALL)
    log = structlog.get_logger("gateway.test")
    log.info("connecting", url=f"postgresql://gw:{URL_PASSWORD}@db/gw", nested={"t": [ADMIN_TOKEN]})
    try:
        raise RuntimeError(f"server said: bad token {READ_TOKEN}")
    except RuntimeError:
        log.exception("failed")
    out = stream.getvalue()
    for secret in ALL:
        assert secret not in out
    assert out.count("***") >= 3
    assert [line["event"] for line in _lines(stream)] == ["connecting", "failed"]


def test_standard_library_logging_goes_out_as_json_lines_redacted():
    stream = io.StringIO()
    logs.configure("json", "info", stream=stream, secrets=ALL)
    try:
        raise OSError(24, f"Too many open files ({AMI_SECRET})")
    except OSError:
        logging.getLogger("asyncio").error("socket.accept() out of system resource",
                                           exc_info=True)
    logging.getLogger("asyncpg.pool").warning("connection lost")
    lines = _lines(stream)  # every line is JSON: a plain-text traceback would not parse
    assert [(line["logger"], line["level"]) for line in lines] == [
        ("asyncio", "error"), ("asyncpg.pool", "warning")]
    assert "Too many open files" in lines[0]["exception"]
    assert AMI_SECRET not in stream.getvalue()


def test_repeated_warnings_are_limited_and_counted():
    now = [1000.0]
    limiter = logs.RateLimiter(burst=3, window=60.0, clock=lambda: now[0])
    passed = 0
    for _ in range(50):
        try:
            limiter(None, "warning", {"event": "agi.peer_rejected", "level": "warning"})
            passed += 1
        except structlog.DropEvent:
            pass
    assert passed == 3
    # info lines (decisions, settlements) are never limited
    for _ in range(50):
        limiter(None, "info", {"event": "decision", "level": "info"})
    now[0] += 61
    event = limiter(None, "warning", {"event": "agi.peer_rejected", "level": "warning"})
    assert event["suppressed"] == 47


async def test_refused_agi_peer_flood_logs_a_bounded_number_of_lines(database_url):
    stream = io.StringIO()
    logs.configure("json", "info", stream=stream)
    gw = Gateway(Config(database_url=database_url, agi_port=0, http_port=0,
                        agi_allowed_peers=("192.0.2.1",), log_format="json"),
                 configure_logs=False)
    await gw.start()
    try:
        for _ in range(60):
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.agi.port)
            await reader.read()  # the gateway closes a refused peer at once
            writer.close()
    finally:
        await gw.stop()
    rejected = [line for line in _lines(stream) if line["event"] == "agi.peer_rejected"]
    assert 1 <= len(rejected) <= logs.RateLimiter().burst


# ---- a started gateway --------------------------------------------------------------------------


async def test_no_secret_in_first_log_line_status_or_metrics(database_url):
    stream = io.StringIO()
    cfg = Config(database_url=_with_passwords(database_url), agi_port=0, http_port=0,
                 admin_token=ADMIN_TOKEN, read_token=READ_TOKEN)
    logs.configure("json", "info", stream=stream, secrets=cfg.secret_values())
    gw = Gateway(cfg, configure_logs=False)
    await gw.start()
    try:
        headers = {"Authorization": f"Bearer {READ_TOKEN}"}
        async with aiohttp.ClientSession(headers=headers) as http:
            base = f"http://127.0.0.1:{gw.http_port}"
            async with http.get(f"{base}/status") as r:
                assert r.status == 200
                status = await r.text()
            async with http.get(f"{base}/metrics") as r:
                assert r.status == 200
                metrics = await r.text()
    finally:
        await gw.stop()
    first = _lines(stream)[0]
    assert first["event"] == "gateway_starting"
    assert first["url"].endswith("?password=***")
    for secret in ALL:
        assert secret not in stream.getvalue()
        assert secret not in status
        assert secret not in metrics


async def test_no_secret_in_a_startup_error(database_url):
    base, _, _ = database_url.rpartition("/")
    # a port nothing listens on: the error names the database, never its password
    url = _with_passwords(base.rsplit(":", 1)[0] + ":1/nope")
    gw = Gateway(Config(database_url=url, agi_port=0, http_port=0), configure_logs=False)
    with pytest.raises(StartupError) as e:
        await gw.start()
    await gw.stop()
    assert "database: cannot connect" in str(e.value)
    for secret in ALL:
        assert secret not in str(e.value)
