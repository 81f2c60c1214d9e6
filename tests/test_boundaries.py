"""The dependency arrows, enforced: server -> adapters -> registry -> common; training ->
adapters, registry, common; only `server.cli` imports training; the engine imports no web,
database or Hugging Face stack (it runs alone on a GPU box)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = ("server", "adapters", "registry", "training", "common", "bench")


def _imports(path: Path) -> set[str]:
    """Top-level package names of every import in a file (lazy ones inside functions too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


ALLOWED = {  # package: which of ours it may import
    "common": set(),
    "registry": {"common"},
    "adapters": {"common", "registry"},
    "training": {"common", "registry", "adapters"},
    "server": {"common", "registry", "adapters"},  # + training, from server/cli only
}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_dependency_arrows(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        allowed = ALLOWED[package] | {package}
        if path.is_relative_to(ROOT / "server" / "cli"):
            allowed = allowed | {"training"}
        for name in _imports(path) & set(OURS):
            if name not in allowed:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, bad


def test_engine_imports_without_the_web_database_or_hf_stack():
    code = ("import sys; import server.engine.engine, server.model, server.engine.graphs; "
            "bad = [m for m in ('fastapi', 'starlette', 'sqlalchemy', 'transformers', 'peft', 'pydantic_settings') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
