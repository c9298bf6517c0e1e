"""The softphone lab's configuration (gateway/lab.py) without starting anything: the
shipped example files with only their addresses, ports and secrets replaced, clear
errors for bad input. The lab running for real: tests/test_lab.py."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from gateway import lab
from gateway.billing.provisioning_file import check_provision_file

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = (REPO / "dialplan" / "pjsip.conf.example").read_text()


def settings(**kw) -> lab.LabSettings:
    s = lab.LabSettings(address="192.0.2.7", sip_port=5070, pstn_port=5072, agi_port=4600,
                        ami_port=5100, ami_secret="s3cret")
    s.passwords = {name: f"pw{name.replace('-', '')}" for name in lab.PHONES}
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def sections(text: str) -> dict[tuple[str, str], dict[str, str]]:
    """(name, type) -> options of a pjsip.conf text, templates' options included."""
    found: list[tuple[str, dict[str, str]]] = []
    templates: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        line = line.split(";", 1)[0].strip()
        if m := re.fullmatch(r"\[([^\]]+)\](?:\(([^)]*)\))?", line):
            parents = [p.strip() for p in (m.group(2) or "").split(",")]
            options: dict[str, str] = {}
            for p in parents:
                options.update(templates.get(p, {}))
            if "!" in parents:
                templates[m.group(1)] = options
            else:
                found.append((m.group(1), options))
        elif "=" in line and (found or templates):
            key, value = (x.strip() for x in line.split("=", 1))
            (options if "!" in parents else found[-1][1])[key] = value
    return {(name, o.get("type", "")): o for name, o in found}


def test_the_lab_loads_the_example_with_only_addresses_ports_and_secrets_replaced():
    s = settings()
    text = lab.pjsip_conf(EXAMPLE, s)
    conf = sections(text)
    assert conf[("transport-udp", "transport")]["bind"] == "192.0.2.7:5070"
    # every phone of the example registers with its lab password, in gateway-outbound
    example_phones = [n for n in lab.PHONES if n not in lab.LAB_PHONES]
    for name in example_phones:
        assert conf[(name, "endpoint")]["context"] == "gateway-outbound"
        assert conf[(name, "endpoint")]["media_address"] == "192.0.2.7"
        assert conf[(name, "endpoint")]["transport"] == "transport-udp"
        assert conf[(name, "auth")]["password"] == s.passwords[name]
        assert conf[(name, "aor")]["max_contacts"] == "1"
    # the carrier trunk points at the simulated carrier's transport
    assert conf[("carrier", "aor")]["contact"] == "sip:192.0.2.7:5072"
    assert conf[("carrier-identify", "identify")]["match"] == "192.0.2.7:5072"
    assert "change-me" not in text and "0.0.0.0" not in text
    assert text.rstrip().endswith("#include pjsip_lab.conf")
    extra = sections(lab.pjsip_lab_conf(s))
    assert extra[("transport-pstn", "transport")]["bind"] == "192.0.2.7:5072"
    assert extra[("pstn-identify", "identify")]["match"] == "192.0.2.7:5070"
    assert extra[("lab-guest", "auth")]["password"] == s.passwords["lab-guest"]


def test_the_example_tenant_and_the_lab_tenant_know_the_printed_phones():
    endpoints = set()
    for name in ("provision.toml", "lab.toml"):
        data = tomllib.loads((REPO / "examples" / name).read_text())
        check_provision_file(data)
        endpoints |= {u["sip_endpoint"] for t in data["tenants"] for u in t["users"]}
    # every printed phone but the guest is a provisioned user, and nothing else is
    assert endpoints == set(lab.PHONES) - {"lab-guest"}
    numbers = [n["e164"] for t in tomllib.loads(
        (REPO / "examples" / "provision.toml").read_text())["tenants"] for n in t["numbers"]]
    assert "+" + lab.TOLL_FREE in numbers


def test_a_shipped_file_without_its_placeholder_is_a_clear_error():
    broken = EXAMPLE.replace("bind=0.0.0.0:5060", "bind=0.0.0.0:5061")
    with pytest.raises(lab.LabError, match=r"bind=0\.0\.0\.0:5060"):
        lab.pjsip_conf(broken, settings())
    with pytest.raises(lab.LabError, match="port = 5038"):
        lab.manager_conf("[general]\n", settings())


def test_manager_conf_is_the_example_with_the_lab_port_and_secret():
    example = (REPO / "dialplan" / "manager.conf.example").read_text()
    text = lab.manager_conf(example, settings())
    assert "port = 5100" in text and "secret = s3cret" in text
    assert "read = call,cdr,system" in text and "bindaddr = 127.0.0.1" in text


def test_phone_passwords_are_kept_across_runs(tmp_path):
    first = lab.phone_passwords(tmp_path)
    assert set(first) == set(lab.PHONES) and len(set(first.values())) == len(first)
    assert lab.phone_passwords(tmp_path) == first
    assert (tmp_path / "phones.json").stat().st_mode & 0o077 == 0


def test_call_in_refuses_a_non_number_and_a_lab_that_is_not_running(tmp_path):
    with pytest.raises(lab.LabError, match="not a number"):
        lab.call_in(tmp_path, "18885550142,maple-front")
    with pytest.raises(lab.LabError, match="no lab is running"):
        lab.call_in(tmp_path, "18885550142")


@pytest.mark.parametrize("argv, message", [
    (["--address", "0.0.0.0"], "not 0.0.0.0"),
    (["--address", "pbx.example"], "not an IPv4 address"),
    (["call-in", "--data-dir", "nowhere"], "no lab is running"),
])
def test_the_command_says_what_is_wrong(argv, message, tmp_path):
    res = subprocess.run([sys.executable, "-m", "gateway", "lab", *argv], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and message in res.stderr, res.stderr


def test_an_example_without_a_printed_phone_is_a_clear_error():
    without = EXAMPLE.replace("[maple-marc]\ntype=auth", "[maple-marc-x]\ntype=auth")
    with pytest.raises(lab.LabError, match="no auth section for maple-marc"):
        lab.pjsip_conf(without, settings())


def test_try_it_documents_every_number_the_lab_prints():
    doc = (REPO / "docs" / "try-it.md").read_text()
    rows = [line for line in doc.splitlines() if line.startswith("| ")]
    for who, number, _ in lab.DIAL:
        caller = "| any" if who.startswith("any") else f"| `{who}` |"
        assert any(row.startswith(caller) and f"| `{number}`" in row for row in rows), \
            (who, number)
    for name in lab.PHONES:
        assert f"`{name}`" in doc, name
