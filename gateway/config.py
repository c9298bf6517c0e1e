"""Configuration: defaults, then a TOML file, then the environment; checked at start.

Every key is documented in ``gateway.example.toml``. Environment variables are the key
in upper case with a ``GATEWAY_`` prefix (``GATEWAY_AGI_PORT``). Secrets may also come
from a file named by ``GATEWAY_<KEY>_FILE`` (Docker and systemd credentials), and are
never printed: ``Config.public()`` masks them.

The PBXs served are ``Config.pbxes``: the ``[[pbx]]`` tables of the file (which come from
the file only), else one PBX of the flat ``ami_*`` keys named ``pbx_name``.
"""

from __future__ import annotations

import ipaddress
import os
import pathlib
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

SECRETS = frozenset({"database_url", "ami_secret", "admin_token", "read_token"})

# A PBX's name: in the configuration, in calls.pbx, in the lease table and as the
# dialplan global GW_PBX on the PBX itself.
PBX_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
DEFAULT_PBX = "default"
# keys of one [[pbx]] table; ami_secret_file is read into ami_secret at load
_PBX_KEYS = ("name", "ami_host", "ami_port", "ami_username", "ami_secret",
             "ami_secret_file", "agi_peers")


class ConfigError(Exception):
    """A configuration value that cannot work; the message names the key."""


def valid_pbx_name(name: object) -> bool:
    """Whether ``name`` is a well-formed PBX name (``[A-Za-z0-9_.-]{1,64}``)."""
    return isinstance(name, str) and PBX_NAME.fullmatch(name) is not None


@dataclass(frozen=True)
class PbxConfig:
    """One PBX this gateway serves: its name (``GW_PBX`` on the PBX), its AMI account
    (empty ``ami_host``: no AMI, recovery from the CDR table only) and the addresses
    its AGI requests come from."""

    name: str = DEFAULT_PBX
    ami_host: str = ""
    ami_port: int = 5038
    ami_username: str = "gateway"
    ami_secret: str = field(default="", repr=False)
    agi_peers: tuple[str, ...] = ()

    def public(self) -> dict[str, Any]:
        """The PBX's values with its AMI secret masked."""
        return {"name": self.name, "ami_host": self.ami_host, "ami_port": self.ami_port,
                "ami_username": self.ami_username,
                "ami_secret": "***" if self.ami_secret else "",
                "agi_peers": list(self.agi_peers)}


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
    # the PBX of the flat keys above (ami_*): its name, GW_PBX in its dialplan
    pbx_name: str = DEFAULT_PBX
    # several PBXs: [[pbx]] tables in the file (instead of the flat ami_* keys)
    pbx: tuple[PbxConfig, ...] = ()
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
    # this process in calls.owner, the heartbeat table and the PBX leases; empty:
    # <hostname>-<agi_port>, so that a restarted gateway renews its own leases at once
    instance_name: str = ""
    heartbeat_seconds: int = 5  # /status lists a process as alive for 4 beats
    # a PBX's lease (its owner process) expires this long after its last renewal
    lease_seconds: int = 6
    # what callers hear ([announce], docs/operations.md "What callers hear"): a prompt
    # before a rejection's SIP failure (per reason, per channel language; TOML table
    # [announce.prompts]), and a warning before a funded call's last deadline
    announce_rejections: bool = True
    announce_prompts: dict[str, Any] = field(default_factory=dict)
    announce_warning_seconds: int = 30  # 0 = no warning
    announce_warning_prompt: str = "beep&beep"
    # webhooks (docs/operations.md, "Webhooks"): the delivery worker of this process
    webhook_enabled: bool = True
    webhook_timeout_seconds: int = 10  # one attempt, connection to answer
    webhook_max_attempts: int = 8  # then the delivery is dead
    webhook_retry_base_seconds: int = 30  # doubled at each attempt, with jitter
    webhook_retry_max_seconds: int = 3600
    webhook_concurrency: int = 4  # attempts in flight per process
    # logging: auto = readable on a terminal, JSON lines otherwise
    log_format: str = "auto"
    log_level: str = "info"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def pbxes(self) -> tuple[PbxConfig, ...]:
        """Every PBX this process serves: the ``[[pbx]]`` tables, else the one PBX of
        the flat keys, named ``pbx_name`` (with or without AMI)."""
        if self.pbx:
            return self.pbx
        return (PbxConfig(name=self.pbx_name, ami_host=self.ami_host, ami_port=self.ami_port,
                          ami_username=self.ami_username, ami_secret=self.ami_secret),)

    def all_agi_peers(self) -> tuple[str, ...]:
        """Who may connect to the AGI server: ``agi_allowed_peers`` plus every PBX's
        ``agi_peers``. Empty (anyone may connect) only when ``agi_allowed_peers`` is
        empty: naming a PBX's peers never narrows an open listener."""
        if not self.agi_allowed_peers:
            return ()
        peers = list(self.agi_allowed_peers)
        for pbx in self.pbxes:
            peers.extend(p for p in pbx.agi_peers if p not in peers)
        return tuple(peers)

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
            elif f.name == "pbx":
                value = [p.public() for p in value]
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
        found.update(p.ami_secret for p in self.pbx if p.ami_secret)
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
        if isinstance(default, dict):
            if not isinstance(raw, dict):
                raise ValueError(raw)
            return raw
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
    tables = values.pop("pbx", None)
    for name in known:
        if name == "pbx":
            continue  # [[pbx]] tables come from the file only
        key = "GATEWAY_" + name.upper()
        if key in env:
            values[name] = env[key]
        elif name in SECRETS and key + "_FILE" in env:
            try:
                values[name] = pathlib.Path(env[key + "_FILE"]).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"{key}_FILE: {exc.strerror}") from exc
    coerced = {n: _coerce(n, v, getattr(cfg, n)) for n, v in values.items()}
    if tables is not None:
        coerced["pbx"] = _pbx_tables(tables)
    cfg = replace(cfg, **coerced)
    check(cfg)
    return cfg


def _pbx_tables(raw: Any) -> tuple[PbxConfig, ...]:
    """The ``[[pbx]]`` array of tables, read into PbxConfig values (checked later)."""
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise ConfigError("pbx: must be an array of tables, [[pbx]] (see gateway.example.toml)")
    return tuple(_pbx_table(i, t) for i, t in enumerate(raw))


def _pbx_table(index: int, table: dict[str, Any]) -> PbxConfig:
    name = table.get("name")
    where = f"pbx[{index}]" + (f" ({name})" if isinstance(name, str) and name else "")
    unknown = sorted(set(table) - set(_PBX_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {', '.join(unknown)}")
    if "name" not in table:
        raise ConfigError(f"{where}.name: every [[pbx]] needs a name")
    if "ami_secret" in table and "ami_secret_file" in table:
        raise ConfigError(f"{where}: give ami_secret or ami_secret_file, not both")
    default = PbxConfig()
    values: dict[str, Any] = {}
    for key in ("name", "ami_host", "ami_port", "ami_username", "ami_secret", "agi_peers"):
        if key in table:
            coerce_as = "ami_secret" if key == "ami_secret" else f"{where}.{key}"
            try:
                values[key] = _coerce(coerce_as, table[key], getattr(default, key))
            except ConfigError as exc:
                # name the table in the message, keep a secret unshown
                raise ConfigError(str(exc).replace("ami_secret:", f"{where}.ami_secret:", 1)
                                  if key == "ami_secret" else str(exc)) from None
    if "ami_secret_file" in table:
        path = table["ami_secret_file"]
        if not isinstance(path, str) or not path:
            raise ConfigError(f"{where}.ami_secret_file: must be a file name")
        try:
            values["ami_secret"] = pathlib.Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{where}.ami_secret_file: {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{where}.ami_secret_file: {path}: not UTF-8 text") from None
    if "agi_peers" in values:  # one spelling per address, for matching a peer exactly
        values["agi_peers"] = tuple(_normal_address(p) for p in values["agi_peers"])
    return PbxConfig(**values)


def _normal_address(peer: str) -> str:
    try:
        return str(ipaddress.ip_address(peer))
    except ValueError:
        return peer  # refused by check(), which names it


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
    _check_pbxes(cfg)
    if cfg.lease_seconds < 3:
        raise ConfigError("lease_seconds must be at least 3 (renewed every third of it)")
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
    if not 1 <= cfg.webhook_timeout_seconds <= 300:
        raise ConfigError("webhook_timeout_seconds must be from 1 to 300")
    if not 1 <= cfg.webhook_max_attempts <= 100:
        raise ConfigError("webhook_max_attempts must be from 1 to 100")
    if not 1 <= cfg.webhook_retry_base_seconds <= cfg.webhook_retry_max_seconds <= 86400:
        raise ConfigError("webhook_retry_base_seconds must be at least 1 and at most "
                          "webhook_retry_max_seconds, itself at most 86400")
    if not 1 <= cfg.webhook_concurrency <= 64:
        raise ConfigError("webhook_concurrency must be from 1 to 64")
    announcements(cfg)  # refuses a prompt or a reason that cannot work


def announcements(cfg: Config) -> Any:
    """The ``[announce]`` keys as ``calls.announce.Announcements``."""
    from .calls.announce import AnnouncementError, Announcements  # noqa: PLC0415

    try:
        return Announcements.configured(
            enabled=cfg.announce_rejections, prompts=cfg.announce_prompts,
            warning_seconds=cfg.announce_warning_seconds,
            warning_prompt=cfg.announce_warning_prompt)
    except AnnouncementError as exc:
        raise ConfigError(str(exc)) from None


def _check_pbxes(cfg: Config) -> None:
    if not valid_pbx_name(cfg.pbx_name):
        raise ConfigError(f"pbx_name: {cfg.pbx_name!r} is not a PBX name "
                          "(1 to 64 of A-Z a-z 0-9 _ . -)")
    if not cfg.pbx:
        return
    if cfg.ami_host:
        raise ConfigError("ami_host: the flat ami_* keys configure one PBX; with [[pbx]] "
                          "tables give each PBX its ami_host in its table instead")
    if cfg.pbx_name != DEFAULT_PBX:
        raise ConfigError("pbx_name: names the PBX of the flat ami_* keys; with [[pbx]] "
                          "tables each PBX has its own name")
    seen: set[str] = set()
    for index, pbx in enumerate(cfg.pbx):
        where = f"pbx[{index}]"
        if not valid_pbx_name(pbx.name):
            raise ConfigError(f"{where}.name: {pbx.name!r} is not a PBX name "
                              "(1 to 64 of A-Z a-z 0-9 _ . -)")
        where = f"pbx[{index}] ({pbx.name})"
        if pbx.name in seen:
            raise ConfigError(f"{where}.name: {pbx.name!r} is given to two [[pbx]] tables")
        seen.add(pbx.name)
        if not 1 <= pbx.ami_port <= 65535:
            raise ConfigError(f"{where}.ami_port: {pbx.ami_port} is not a TCP port")
        if pbx.ami_host and not pbx.ami_secret:
            raise ConfigError(f"{where}.ami_secret: required when ami_host is set "
                              "(or ami_secret_file)")
        for peer in pbx.agi_peers:
            try:
                ipaddress.ip_address(peer)
            except ValueError:
                raise ConfigError(f"{where}.agi_peers: {peer!r} is not an IP address") from None
