"""wrk, the load generator for the throughput and latency rows.

wrk is C with an epoll loop per thread: it drives a single-worker Python server to
saturation with a fraction of a core, which a Python client on a 2-core machine cannot.
Bodies are read from files by the Lua script (``io.open``); the "distinct" script builds
each request as ``prefix .. tag .. suffix`` so every request is a new image (a miss).
The ``done`` hook prints one JSON line with the counts and latency percentiles.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MARK = "BENCHJSON "

_COMMON = r"""
local function slurp(path)
  local f = assert(io.open(path, "rb"))
  local data = f:read("*a")
  f:close()
  return data
end

local function add_headers(spec)
  for pair in string.gmatch(spec, "[^\n]+") do
    local name, value = string.match(pair, "^([^:]+):%s*(.*)$")
    if name then wrk.headers[name] = value end
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""

#: One fixed body for every request (the cache-hit row). ARGS: body file, headers.
STATIC = (
    _COMMON
    + r"""
function init(args)
  wrk.method = "POST"
  wrk.body = slurp(args[1])
  add_headers(args[2])
end
"""
)

#: A distinct image per request. ARGS: prefix file, suffix file, run tag (8 chars), headers.
DISTINCT = (
    _COMMON
    + r"""
local nthreads = 0
function setup(thread)
  nthreads = nthreads + 1
  thread:set("tid", nthreads)
end

local prefix, suffix, tag
local counter = 0
function init(args)
  prefix = slurp(args[1])
  suffix = slurp(args[2])
  tag = args[3]
  wrk.method = "POST"
  add_headers(args[4])
end

function request()
  counter = counter + 1
  local body = prefix .. string.format("%s%02d%010d", tag, tid, counter) .. suffix
  return wrk.format(nil, nil, nil, body)
end
"""
)


#: Headers only, no body (row 7): a GET lookup, or a POST that declares its body and sends only its
#: headers, as an ``Expect: 100-continue`` client does until it is told to continue. ARGS: method, headers.
HEADERS_ONLY = (
    _COMMON
    + r"""
function init(args)
  wrk.method = args[1]
  wrk.body = nil
  add_headers(args[2])
end
"""
)


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    errors: int  # socket errors + non-2xx/3xx statuses + timeouts
    non_2xx: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @classmethod
    def parse(cls, data: dict[str, Any]) -> WrkResult:
        errors = sum(int(data[k]) for k in ("connect", "read", "write", "status", "timeout"))
        return cls(
            requests=int(data["requests"]),
            seconds=int(data["duration_us"]) / 1e6,
            errors=errors,
            non_2xx=int(data["status"]),
            p50_ms=data["p50_us"] / 1000,
            p90_ms=data["p90_us"] / 1000,
            p99_ms=data["p99_us"] / 1000,
            max_ms=data["max_us"] / 1000,
            mean_ms=data["mean_us"] / 1000,
        )


def available() -> str | None:
    return shutil.which("wrk")


def version() -> str:
    binary = available()
    if binary is None:
        return "missing"
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    return (out.stdout or out.stderr).split("Copyright")[0].strip()


def headers_arg(headers: dict[str, str]) -> str:
    return "\n".join(f"{k}: {v}" for k, v in headers.items())


def run(
    url: str,
    script: Path,
    args: list[str],
    *,
    seconds: float,
    connections: int,
    threads: int = 2,
    timeout_s: float = 10.0,
) -> WrkResult:
    binary = available()
    if binary is None:
        raise FileNotFoundError("wrk")
    threads = max(1, min(threads, connections))
    argv = [
        binary,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={timeout_s:g}s",
        "-s",
        str(script),
        url,
        "--",
        *args,
    ]
    out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=seconds + timeout_s + 30)
    for line in out.stdout.splitlines():
        if line.startswith(MARK):
            return WrkResult.parse(json.loads(line[len(MARK) :]))
    raise RuntimeError(f"wrk gave no result (exit {out.returncode}):\n{out.stdout}\n{out.stderr}")


def write_scripts(workdir: Path) -> tuple[Path, Path]:
    static, distinct = workdir / "static.lua", workdir / "distinct.lua"
    static.write_text(STATIC)
    distinct.write_text(DISTINCT)
    return static, distinct


def write_headers_only(workdir: Path) -> Path:
    path = workdir / "headers-only.lua"
    path.write_text(HEADERS_ONLY)
    return path
