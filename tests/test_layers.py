"""The import rules of docs/architecture.md, read from the code: each layer imports only
what the layers table lets it, so the layering holds in the code, not only on paper."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gateway"

# modules every layer may use: shared leaves that import no layer themselves
LEAVES = {"gateway.errors", "gateway.logs", "gateway.metrics", "gateway.dialplan_variables"}

# layer -> the gateway packages it must never import (docs/architecture.md, "Layers")
NEVER = {
    "wire": {"gateway.rating", "gateway.store", "gateway.billing", "gateway.calls",
             "gateway.http", "gateway.cli", "gateway.app"},
    "rules": {"gateway.store", "gateway.agi", "gateway.ami", "gateway.billing",
              "gateway.calls", "gateway.http", "gateway.cli", "gateway.app"},
    "store": {"gateway.agi", "gateway.ami", "gateway.billing", "gateway.calls",
              "gateway.http", "gateway.cli", "gateway.app"},
    "billing": {"gateway.agi", "gateway.ami", "gateway.calls", "gateway.http", "gateway.cli",
                "gateway.app"},
    "calls": {"gateway.store", "gateway.http", "gateway.cli", "gateway.app"},
    # the two surfaces share the billing layer, never each other's code
    "http": {"gateway.store", "gateway.agi", "gateway.ami", "gateway.cli"},
    "cli": {"gateway.store", "gateway.agi", "gateway.ami", "gateway.http"},
    "leaf": {"gateway.agi", "gateway.ami", "gateway.rating", "gateway.store", "gateway.billing",
             "gateway.calls", "gateway.http", "gateway.cli", "gateway.app"},
    "root": set(),
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:  # gateway/__init__.py
        return "root"
    top = parts[1]
    return {
        "agi": "wire", "ami": "wire", "rating": "rules", "store": "store",
        "billing": "billing", "calls": "calls", "http": "http", "cli": "cli",
        "app": "root", "config": "root", "__main__": "root", "__init__": "root",
        "lab": "root",
    }.get(top, "leaf" if module in LEAVES else "unknown")


def module_name(path: Path, root: Path = PACKAGE) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, root: Path = PACKAGE) -> set[str]:
    """Absolute names of the gateway modules a file imports (relative imports resolved)."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            # "from . import logs" names modules in the alias list
            found.update(f"{target}.{a.name}" for a in node.names)
    return {name for name in found if name == "gateway" or name.startswith("gateway.")}


def violations(path: Path, root: Path = PACKAGE) -> list[str]:
    module = module_name(path, root)
    banned = NEVER[layer_of(module)]
    return sorted(f"{module} imports {name}" for name in imports_of(path, root)
                  if any(name == b or name.startswith(b + ".") for b in banned))


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    unknown = [module_name(p) for p in SOURCES if layer_of(module_name(p)) == "unknown"]
    assert unknown == [], "add new top-level modules to the layers table and to this test"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_module_keeps_the_import_rules(path):
    assert violations(path) == []


def test_only_billing_and_the_root_reach_the_store():
    reach = sorted({module_name(p) for p in SOURCES
                    if any(n.startswith("gateway.store") for n in imports_of(p))
                    and layer_of(module_name(p)) not in ("billing", "store")})
    assert reach == ["gateway.app"]


def test_the_check_sees_relative_and_aliased_imports(tmp_path):
    root = tmp_path / "gateway"
    (root / "calls").mkdir(parents=True)
    bad = root / "calls" / "bad.py"
    bad.write_text("from ..store import repository\nfrom .. import http\n"
                   "import gateway.store.pool as p\nfrom ..billing import rater\n")
    assert violations(bad, root) == [
        "gateway.calls.bad imports gateway.http",
        "gateway.calls.bad imports gateway.store",
        "gateway.calls.bad imports gateway.store.pool",
        "gateway.calls.bad imports gateway.store.repository",
    ]
