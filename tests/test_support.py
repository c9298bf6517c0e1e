"""Test tools are a package: test modules share helpers through ``tests/support/``,
never by importing one another (or the conftest)."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def imported_modules(source: str, package: str) -> set[str]:
    """Every module ``source`` imports, relative imports resolved against ``package``
    (the dotted package the file sits in, e.g. ``tests.support``)."""
    parts = package.split(".")
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = parts[: len(parts) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            # ``from tests import test_cli`` imports the module tests.test_cli
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def is_test_module(module: str) -> bool:
    """A module pytest collects or loads as a conftest, as opposed to a tool."""
    parts = module.split(".")
    return parts[0] == "tests" and (parts[-1].startswith("test_") or parts[-1] == "conftest")


def test_no_test_module_imports_another():
    offenders = {}
    for path in sorted(TESTS.rglob("*.py")):
        package = ".".join(["tests", *path.relative_to(TESTS).parent.parts])
        bad = sorted(m for m in imported_modules(path.read_text(), package) if is_test_module(m))
        if bad:
            offenders[str(path.relative_to(TESTS))] = bad
    assert offenders == {}, "import shared helpers from tests/support/ instead"


@pytest.mark.parametrize("line", [
    "from .test_rater import ledger_agrees",
    "from .conftest import need",
    "from tests.test_http_api import Client",
    "from tests import test_cli",
    "from . import conftest",
    "import tests.test_http_status",
])
def test_the_check_sees_each_form_of_sideways_import(line):
    assert any(is_test_module(m) for m in imported_modules(line, "tests"))


def test_the_check_lets_support_imports_through():
    lines = "from tests.support.ledger import ledger_agrees\nfrom .support import pbx\n"
    assert not any(is_test_module(m) for m in imported_modules(lines, "tests"))


# pytest's own markers and those of its plugins (pytest-timeout, pytest-asyncio)
BUILT_IN_MARKERS = {"parametrize", "skip", "skipif", "xfail", "usefixtures", "filterwarnings",
                    "timeout", "asyncio"}


def registered_markers() -> dict[str, str]:
    """The markers pyproject.toml registers, by name."""
    config = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())
    lines = config["tool"]["pytest"]["ini_options"]["markers"]
    return dict(line.split(":", 1) for line in lines)


def test_every_marker_is_registered_and_named_in_the_readme():
    used = {m for path in TESTS.rglob("*.py")
            for m in re.findall(r"pytest\.mark\.(\w+)", path.read_text())}
    registered = registered_markers()
    assert used - BUILT_IN_MARKERS <= registered.keys()
    assert {"db", "pbx", "faults", "fleet", "containers"} <= registered.keys()
    readme = (TESTS.parent / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in registered)
