"""The import direction (``[tool.importlinter]`` in pyproject.toml) holds, and its contracts bite.

``lint-imports`` checks the real tree. Then each contract is shown to catch the kind of
import it exists to forbid: the tree is copied, one offending import is planted, and the
named contract must break — so a contract that silently matched nothing would fail here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path, *contracts: str) -> subprocess.CompletedProcess[str]:
    args = [str(LINT_IMPORTS), "--no-logo", "--no-cache", "--config", str(root / "pyproject.toml")]
    for contract in contracts:
        args += ["--contract", contract]
    # PYTHONPATH first: the copy's ``app`` shadows the installed (editable) one.
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=60, check=False)


def test_the_tree_keeps_every_contract() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    shutil.copytree(ROOT / "app", root / "app", ignore=shutil.ignore_patterns("__pycache__", "static", "*.json"))
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


@pytest.mark.parametrize(
    ("contract", "module", "planted"),
    [
        ("layers", "app/service.py", "import app.runtime"),
        ("http-on-top", "app/runtime.py", "import app.api.deps"),
        ("main-only-cli", "app/api/v1.py", "import app.main"),
        ("routes-independent", "app/api/compat.py", "import app.api.v1"),
        ("contract-pure", "app/upstream/contract.py", "import app.errors"),
        ("sim-alone", "app/sim/faults.py", "import app.tenants"),
        ("sim-sandbox-only", "app/service.py", "import app.sim"),
        ("client-light", "app/client.py", "import redis"),
    ],
)
def test_each_contract_catches_what_it_forbids(tree_copy: Path, contract: str, module: str, planted: str) -> None:
    path = tree_copy / module
    original = path.read_text()
    assert lint_imports(tree_copy, contract).returncode == 0
    path.write_text(original + f"\n{planted}  # planted by the test\n")
    try:
        result = lint_imports(tree_copy, contract)
    finally:
        path.write_text(original)
    assert result.returncode != 0, result.stdout
    assert "1 broken" in result.stdout
