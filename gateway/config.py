"""Configuration: defaults, then a TOML file, then the environment; checked at start.

Every key is documented in ``gateway.example.toml``. Environment variables are the key
in upper case with a ``GATEWAY_`` prefix (``GATEWAY_AGI_PORT``). Secrets may also come
from a file named by ``GATEWAY_<KEY>_FILE`` (Docker and systemd credentials), and are
never printed: ``Config.public()`` masks them.
"""

from __future__ import annotations

import ipaddress
import os
import pathlib
import tomllib
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

SECRETS = frozenset({"database_url", "ami_secret", "admin_token", "read_token"})


class ConfigError(Exception):
    """A configuration value that cannot work; the message names the key."""


@dataclass(frozen=True)
class Config:
    # database; empty = embedded PostgreSQL in data_dir
    database_url: str = ""
    data_dir: str = "var"
    db_pool_size: int = 10
    # FastAGI server
    agi_host: str = "127.0.0.1"
    agi_port: int = 4573
    agi_allowed_peers: tuple[str, ...] = ("127.0.0.1", "::1")
    agi_max_sessions: int = 500
    # AMI client; empty host = not configured
    ami_host: str = ""
    ami_port: int = 5038
    ami_username: str = "gateway"
    ami_secret: str = ""
    # HTTP
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    http_max_connections: int = 256  # lowered at start to leave AGI its descriptors
    http_header_timeout_seconds: int = 10  # a request header must arrive within this
    http_request_timeout_seconds: int = 60  # one request, body and answer included
    admin_token: str = ""
    read_token: str = ""  # empty: /status and /metrics open (bind them to loopback)
    # rating
    slice_seconds: int = 300
    renew_before_seconds: int = 30  # renew this long before a slice ends
    reconcile_interval_seconds: int = 60
    # recovery (docs/operations.md, "what happens when..."): an open call past its funded
    # end plus this grace is settled from the PBX's record, else by the estimate
    settle_grace_seconds: int = 60
    ring_allowance_seconds: int = 300  # longest ringing, for calls never seen answered
    # this process in calls.owner and the heartbeat table; empty: <hostname>-<agi_port>,
    # so that a restarted gateway knows its previous incarnation's calls as its own
    instance_name: str = ""
    heartbeat_seconds: int = 5  # expires after 4 beats: another process adopts
    # logging: auto = readable on a terminal, JSON lines otherwise
    log_format: str = "auto"
    log_level: str = "info"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def public(self) -> dict[str, Any]:
        """Values safe to show: secrets masked, the database URL without its password."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if f.name == "database_url" and value:
                value = _mask_url(value)
            elif f.name in SECRETS and value:
                value = "***"
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


    def secret_values(self) -> tuple[str, ...]:
        """Every secret string this configuration holds (tokens, the AMI secret, the
        database URL and each password inside it), for the log redactor."""
        found: set[str] = set()
        for name in SECRETS:
            value = getattr(self, name)
            if value:
                found.add(value)
        if self.database_url:
            found.update(_url_passwords(self.database_url))
        return tuple(sorted(found, key=len, reverse=True))


# query parameters of a PostgreSQL URL that carry a secret (libpq and asyncpg spellings)
_SECRET_PARAMS = ("password", "sslpassword", "passfile", "sslkey")


def _url_passwords(url: str) -> set[str]:
    try:
        parts = urlsplit(url)
        found = {parts.password} if parts.password else set()
        query = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        return set()
    found.update(v for k, v in query if k.lower() in _SECRET_PARAMS and v)
    return found


def _mask_url(url: str) -> str:
    """The URL with its password (in the user part or in ``?password=``) shown as ***."""
    try:
        parts = urlsplit(url)
        password = parts.password
        query = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        return "***"  # not a URL we can take apart: show none of it
    if password:
        user, _, host = parts.netloc.rpartition("@")
        parts = parts._replace(netloc=f"{user.partition(':')[0]}:***@{host}")
    if any(k.lower() in _SECRET_PARAMS for k, _ in query):
        masked = [(k, "***" if k.lower() in _SECRET_PARAMS else v) for k, v in query]
        parts = parts._replace(query=urlencode(masked, safe="*"))
    return parts.geturl()


def _coerce(name: str, raw: Any, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("1", "true", "yes", "on"):
                return True
            if str(raw).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(default, int):
            if isinstance(raw, bool):
                raise ValueError(raw)
            return int(raw)
        if isinstance(default, tuple):
            if isinstance(raw, str):
                return tuple(p.strip() for p in raw.split(",") if p.strip())
            return tuple(str(p) for p in raw)
        if not isinstance(raw, str):
            raise ValueError(raw)
        return raw
    except (TypeError, ValueError) as exc:
        if name in SECRETS:
            # never echo a secret, not even a mistyped one (nor chain the error that holds it)
            raise ConfigError(f"{name}: cannot read the value (a {type(raw).__name__}, not "
                              f"shown: secret) as {type(default).__name__}") from None
        raise ConfigError(f"{name}: cannot read {raw!r} as {type(default).__name__}") from exc


def load(path: str | os.PathLike[str] | None = None,
         environ: dict[str, str] | None = None) -> Config:
    """Build the configuration and check it. ``path`` defaults to $GATEWAY_CONFIG."""
    env = os.environ if environ is None else environ
    cfg = Config()
    known = {f.name: f for f in fields(Config) if f.name != "extra"}
    values: dict[str, Any] = {}
    path = path or env.get("GATEWAY_CONFIG")
    if path:
        try:
            data = tomllib.loads(pathlib.Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from exc
        flat = _flatten(data)
        unknown = sorted(set(flat) - set(known))
        if unknown:
            raise ConfigError(f"config file {path}: unknown keys {', '.join(unknown)}")
        values.update(flat)
    for name in known:
        key = "GATEWAY_" + name.upper()
        if key in env:
            values[name] = env[key]
        elif name in SECRETS and key + "_FILE" in env:
            try:
                values[name] = pathlib.Path(env[key + "_FILE"]).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"{key}_FILE: {exc.strerror}") from exc
    coerced = {n: _coerce(n, v, getattr(cfg, n)) for n, v in values.items()}
    cfg = replace(cfg, **coerced)
    check(cfg)
    return cfg


def _flatten(data: dict[str, Any]) -> dict[str, Any]:
    """Sections become prefixes: [agi] port = 1 -> agi_port."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                flat[f"{key}_{sub}"] = v
        else:
            flat[key] = value
    return flat


def check(cfg: Config) -> None:
    if cfg.database_url:
        try:
            parts = urlsplit(cfg.database_url)
            hostname = parts.hostname
        except ValueError:  # e.g. an unclosed [ or a port that is not a number
            parts, hostname = None, None
        if parts is None or parts.scheme not in ("postgresql", "postgres") or not hostname \
                and "host=" not in parts.query:
            raise ConfigError("database_url must look like postgresql://user@host:5432/name")
    if cfg.http_max_connections < 1:
        raise ConfigError("http_max_connections must be at least 1")
    if not 1 <= cfg.http_header_timeout_seconds <= 3600:
        raise ConfigError("http_header_timeout_seconds must be from 1 to 3600")
    if not 1 <= cfg.http_request_timeout_seconds <= 3600:
        raise ConfigError("http_request_timeout_seconds must be from 1 to 3600")
    for name in ("agi_port", "ami_port", "http_port"):
        port = getattr(cfg, name)
        if not 0 <= port <= 65535:
            raise ConfigError(f"{name}: {port} is not a TCP port")
    for peer in cfg.agi_allowed_peers:
        try:
            ipaddress.ip_network(peer, strict=False)
        except ValueError as exc:
            raise ConfigError(f"agi_allowed_peers: {peer!r} is not an address or network") \
                from exc
    if cfg.ami_host and not cfg.ami_secret:
        raise ConfigError("ami_secret is required when ami_host is set")
    if not 1 <= cfg.slice_seconds <= 86400:
        raise ConfigError("slice_seconds must be from 1 to 86400")
    if not 1 <= cfg.renew_before_seconds:
        raise ConfigError("renew_before_seconds must be at least 1")
    if cfg.heartbeat_seconds < 1:
        raise ConfigError("heartbeat_seconds must be at least 1")
    if cfg.settle_grace_seconds < 0 or cfg.ring_allowance_seconds < 0:
        raise ConfigError("settle_grace_seconds and ring_allowance_seconds must not be "
                          "negative")
    if cfg.log_format not in ("auto", "json", "console"):
        raise ConfigError("log_format must be auto, json or console")
    if cfg.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError("log_level must be debug, info, warning or error")
    if cfg.db_pool_size < 2:
        raise ConfigError("db_pool_size must be at least 2")
