"""py-spy recordings of a gateway under load, and a text summary of where the time goes.

``py-spy record`` samples the running process from outside (no code change, no import
hooks) and writes a speedscope file (open it at https://www.speedscope.app). The summary
aggregates its samples: self time by function and by package, and inclusive time of the
functions on facegate's request path.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROFILES = Path(__file__).resolve().parent / "profiles"


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def start(pid: int, out: Path, seconds: float, rate: int = 200) -> subprocess.Popen[bytes]:
    binary = py_spy()
    if binary is None:
        raise FileNotFoundError("py-spy")
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [binary, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", str(rate)]
    argv += ["--format", "speedscope", "--output", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@dataclass
class Summary:
    seconds: float
    self_by_function: list[tuple[str, float]]
    self_by_package: list[tuple[str, float]]
    inclusive: list[tuple[str, float]]

    def text(self, top: int = 15) -> str:
        lines = [f"{self.seconds:.1f} s of non-idle samples; % of those"]
        lines.append("self time by package:")
        lines += [f"  {pct:5.1f}%  {name}" for name, pct in self.self_by_package[:12]]
        lines.append(f"self time, top {top} functions:")
        lines += [f"  {pct:5.1f}%  {name}" for name, pct in self.self_by_function[:top]]
        lines.append(f"inclusive time, top {top + 10} facegate functions and key framework steps:")
        lines += [f"  {pct:5.1f}%  {name}" for name, pct in self.inclusive[: top + 10]]
        return "\n".join(lines)


def _package(path: str) -> str:
    """A readable owner for a source file: app.<module>, a site-package, or the stdlib module."""
    p = path.replace("\\", "/")
    if "/site-packages/" in p:
        rest = p.split("/site-packages/", 1)[1]
        return rest.split("/", 1)[0].removesuffix(".py")
    if "/app/" in p and "/lib/python" not in p:
        rest = p.rsplit("/app/", 1)[1]
        return "app." + rest.removesuffix(".py").replace("/", ".")
    if "/lib/python" in p:
        rest = p.split("/lib/python", 1)[1].split("/", 1)[-1]
        return "stdlib:" + rest.split("/", 1)[0].removesuffix(".py")
    return p.rsplit("/", 1)[-1] or "?"


def _idle(frame: dict[str, Any]) -> bool:
    """An executor thread waiting for work: py-spy does not always see it as idle."""
    return frame.get("name") == "_worker" and str(frame.get("file", "")).endswith("concurrent/futures/thread.py")


def _label(frame: dict[str, Any], pkg: str) -> str:
    name = str(frame.get("name", "?"))
    if name == "Runner.run" and pkg == "stdlib:asyncio":
        # Below this frame there is only uvloop's C code: epoll, socket reads and writes, and
        # the httptools parser's C side. py-spy sees no Python frame there.
        return "[event loop C code: uvloop I/O + httptools] (Runner.run)"
    return name


#: Framework functions worth an inclusive number (the rest of the framework is a pass-through chain).
_KEY_FRAMEWORK = frozenset(
    {
        "solve_dependencies",
        "serialize_response",
        "run_endpoint_function",
        "Request.stream",
        "Request.form",
        "RequestResponseCycle.send",
        "RequestResponseCycle.receive",
        "HttpToolsProtocol.data_received",
        "HttpToolsProtocol.on_body",
        "HttpToolsProtocol.on_headers_complete",
        "MultipartParser.write",
        "Redis.execute_command",
        "Script.__call__",
        "AbstractConnection.send_packed_command",
        "AbstractConnection.read_response",
        "Logger.info",
        "Logger._log",
        "Histogram.observe",
        "Counter.inc",
        "MetricWrapperBase.labels",
        "JSONResponse.render",
        "Response.__init__",
    }
)


def _interesting(pkg: str, name: str) -> bool:
    if pkg in ("app.__main__", "app.cli"):  # the process's entry frames: always 100 %
        return False
    return pkg.startswith("app.") or name in _KEY_FRAMEWORK


def summarize(path: Path) -> Summary:
    data: dict[str, Any] = json.loads(path.read_text())
    frames = data["shared"]["frames"]
    names = []
    packages = []
    for f in frames:
        file = str(f.get("file") or "")
        pkg = _package(file)
        packages.append(pkg)
        short = file.rsplit("/", 1)[-1]
        names.append(f"{_label(f, pkg)} ({pkg}:{short}:{f.get('line', '?')})")
    self_fn: defaultdict[str, float] = defaultdict(float)
    self_pkg: defaultdict[str, float] = defaultdict(float)
    incl: defaultdict[str, float] = defaultdict(float)
    total = 0.0
    for profile in data["profiles"]:
        for stack, weight in zip(profile["samples"], profile["weights"], strict=True):
            if not stack:
                continue
            w = float(weight)
            total += w
            leaf = stack[-1]
            if _idle(frames[leaf]):
                continue
            self_fn[names[leaf]] += w
            self_pkg[packages[leaf]] += w
            seen = set()
            for idx in stack:
                plain = str(frames[idx].get("name", "?"))
                label = f"{plain} ({packages[idx]})"
                if label in seen or not _interesting(packages[idx], plain):
                    continue
                seen.add(label)
                incl[label] += w
    if total == 0:
        return Summary(0, [], [], [])

    def pct(weights: dict[str, float]) -> list[tuple[str, float]]:
        ranked = sorted(weights.items(), key=lambda kv: -kv[1])
        return [(name, 100.0 * w / total) for name, w in ranked]

    return Summary(total, pct(self_fn), pct(self_pkg), pct(incl))
