"""TypeScript types generated from the running gateway's /openapi.json, then type-checked.

openapi-typescript and TypeScript (pinned in tests/typescript/package.json and its lock file,
installed once per lock file into the user's cache directory with ``npm ci``) turn the served
document into ``facegate.d.ts``; ``tsc --strict`` then compiles ``tests/typescript/check.ts``,
which reads answers and problems through the generated types (and must fail to read a field
that is not there), and a list of every operationId of the document as ``keyof operations``.
Skipped, saying so, where npm is not installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import Gateway

HERE = Path(__file__).parent.parent / "typescript"


def _tools() -> Path:
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed: the TypeScript client check needs node and npm")
    lock = (HERE / "package-lock.json").read_bytes()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    tools = cache / "facegate" / f"openapi-typescript-{hashlib.sha256(lock).hexdigest()[:16]}"
    if not (tools / "node_modules" / ".bin" / "tsc").exists():
        tools.mkdir(parents=True, exist_ok=True)
        for name in ("package.json", "package-lock.json"):
            shutil.copy(HERE / name, tools / name)
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
            cwd=tools,
            check=True,
            capture_output=True,
            timeout=240,
        )
    return tools / "node_modules" / ".bin"


@pytest.mark.timeout(300)
def test_typescript_types_from_the_document_compile(gateway: Gateway, tmp_path: Path) -> None:
    bin_dir = _tools()
    generated = subprocess.run(
        [str(bin_dir / "openapi-typescript"), f"{gateway.url}/openapi.json", "-o", str(tmp_path / "facegate.d.ts")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert generated.returncode == 0, generated.stdout + generated.stderr
    shutil.copy(HERE / "check.ts", tmp_path / "check.ts")
    document = httpx.get(f"{gateway.url}/openapi.json", timeout=10).json()
    ids = sorted(op["operationId"] for methods in document["paths"].values() for op in methods.values())
    (tmp_path / "ids.ts").write_text(
        'import type { operations } from "./facegate";\n'
        f"export const every: (keyof operations)[] = {json.dumps(ids)};\n"
    )
    checked = subprocess.run(
        [str(bin_dir / "tsc"), "--noEmit", "--strict", "--skipLibCheck", "check.ts", "ids.ts"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
