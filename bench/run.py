"""``python -m bench.run`` (``make bench``): every benchmark row in one run, one table.

    python -m bench.run                 # all rows, ~6-7 minutes on 2 cores
    python -m bench.run --quick         # shorter runs, ~1-2 minutes
    python -m bench.run --rows 1,3      # only some rows
    python -m bench.run --rows 1 --profile   # + py-spy recordings of the hit path

Prints the table and rewrites BENCHMARKS.md (``--no-write`` to skip). See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from bench import procs, wrkrun
from bench.cluster_rows import CLUSTER_ROWS
from bench.pool_rows import POOL_ROWS
from bench.rows import ROWS, Bench, Line, Options, remove, selected, workdir

ROWS.update(POOL_ROWS)
ROWS.update(CLUSTER_ROWS)

OUT = procs.ROOT / "BENCHMARKS.md"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def mem_total_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return 0.0


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "missing"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else "?"


def _pkg(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> list[tuple[str, str]]:
    load = os.getloadavg()
    return [
        ("CPU", cpu_model()),
        ("cores", str(os.cpu_count())),
        ("memory", f"{mem_total_gb():.1f} GiB"),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        (
            "server stack",
            f"uvicorn {_pkg('uvicorn')} (loop=auto → uvloop {_pkg('uvloop')}, http=auto → httptools "
            f"{_pkg('httptools')}), FastAPI {_pkg('fastapi')}, Starlette {_pkg('starlette')}",
        ),
        ("load generator", wrkrun.version()),
        ("nginx", _version(["nginx", "-v"])),
        ("load average at start", f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"),
    ]


class CpuWatch:
    """How much CPU the rest of the machine used while we ran: benchmarks on a shared 2-core box
    are only as good as that number is small. Ours = this process + its reaped children (every
    server and wrk run is a child); the machine's = busy jiffies in /proc/stat."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.busy0, self.steal0 = self._machine()
        self.ours0 = self._ours()

    @staticmethod
    def _machine() -> tuple[float, float]:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError):
            return 0.0, 0.0
        hz = os.sysconf("SC_CLK_TCK")
        user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        return (user + nice + system + irq + softirq) / hz, steal / hz

    @staticmethod
    def _ours() -> float:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    def summary(self) -> str:
        elapsed = max(1e-9, time.monotonic() - self.t0)
        busy, steal = self._machine()
        ours = self._ours() - self.ours0
        others = max(0.0, (busy - self.busy0) - ours)
        return (
            f"{others / elapsed:.2f} cores busy with other processes on average during the run "
            f"(this run: {ours / elapsed:.2f} cores; hypervisor steal {(steal - self.steal0) / elapsed:.2f})"
        )


def table(lines: list[Line]) -> str:
    out = ["| row | measurement | result | target | verdict |", "|---|---|---|---|---|"]
    for item in lines:
        cells = [str(item.row), item.what, item.result, item.target, f"**{item.verdict}**" if item.verdict else ""]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out)


def markdown(b: Bench, command: str, facts: list[tuple[str, str]], started: datetime, took: float) -> str:
    verdicts = [item for item in b.lines if item.verdict in ("PASS", "FAIL")]
    passed = sum(item.verdict == "PASS" for item in verdicts)
    parts = [
        "# facegate benchmarks",
        "",
        "Generated by the benchmark harness (`bench/`, see `bench/README.md`); do not edit by hand.",
        "",
        f"- command: `{command}`",
        f"- date: {started.strftime('%Y-%m-%d %H:%M UTC')} (took {took:.0f} s)",
    ]
    parts += [f"- {name}: {value}" for name, value in facts]
    parts += [
        "- gateway under test: `python -m app serve` (one uvicorn worker, as in production), "
        "`FACEGATE_LOG_LEVEL=warning` unless the line says `log info` (one JSON access-log line per request), "
        "`FACEGATE_LOG_FORMAT=json`, upstream = the simulator (`python -m app.sim --faces hash`) on loopback, "
        f"Redis: {b.redis_note}",
        "",
        f"## Results ({passed}/{len(verdicts)} targets met)",
        "",
        table(b.lines),
        "",
    ]
    if b.details:
        parts += ["## How each row was measured", ""] + [f"- {d}" for d in b.details] + [""]
    if b.notes:
        parts += ["## Notes from this run", ""] + [f"- {n}" for n in b.notes] + [""]
    history = procs.ROOT / "bench" / "HISTORY.md"
    if history.exists():  # hand-written: what changed between runs, and what it bought
        parts += [history.read_text().rstrip(), ""]
    if b.profiles:
        parts += ["## Profiles (py-spy, under wrk load: the hit path, and with --profile also the miss path)", ""]
        for name, text in b.profiles.items():
            parts += [f"### {name}", "", "```", text, "```", ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="short runs (about a minute or two)")
    p.add_argument("--rows", help="comma-separated rows to run (1-11); default all")
    p.add_argument("--seconds", type=float, help="wrk run length (default 10, --quick 3)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections for row 1 (default 32)")
    p.add_argument("--profile", action="store_true", help="record the hit path with py-spy (bench/profiles/)")
    p.add_argument("--no-write", action="store_true", help="do not rewrite BENCHMARKS.md")
    p.add_argument("--keep", action="store_true", help="keep the work directory (server logs)")
    args = p.parse_args(argv)

    opts = Options(
        rows=selected(args.rows),
        quick=args.quick,
        seconds=args.seconds or (3.0 if args.quick else 10.0),
        warmup=1.0 if args.quick else 2.0,
        connections=args.connections,
        profile=args.profile,
        info_logs=not args.quick,
    )
    given = sys.argv[1:] if argv is None else argv
    command = "python -m bench.run" + (" " + shlex.join(given) if given else "")
    facts = machine()
    started, t0 = datetime.now(UTC), time.monotonic()
    watch = CpuWatch()
    print(f"facegate benchmarks: rows {sorted(opts.rows)}{' (quick)' if opts.quick else ''}", flush=True)
    for name, value in facts:
        print(f"  {name}: {value}")
    if not wrkrun.available():
        print("  WARNING: wrk is not installed (apt-get install wrk): rows 1 and 2 are skipped", flush=True)
    wd = workdir()
    bench = Bench(opts, wd)
    print(f"  Redis: {bench.redis_note}", flush=True)
    try:
        for row in sorted(opts.rows):
            now_load = os.getloadavg()[0]
            bench.details.append(f"Row {row} started at load average {now_load:.2f} (1 min).")
            print(f"row {row} ... (load average {now_load:.2f})", flush=True)
            ROWS[row](bench)
    finally:
        bench.close()
        if args.keep:
            print(f"work directory kept: {wd}")
        else:
            remove(wd)
    took = time.monotonic() - t0
    load = os.getloadavg()
    facts.append(("load average at end", f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"))
    facts.append(("contention", watch.summary()))
    print()
    print(f"contention: {facts[-1][1]}")
    print(table(bench.lines))
    for note in bench.notes:
        print(f"note: {note}")
    for name, text in bench.profiles.items():
        print(f"\nprofile: {name}\n{text}")
    if not args.no_write:
        OUT.write_text(markdown(bench, command, facts, started, took))
        print(f"\nwrote {OUT.relative_to(procs.ROOT)} ({took:.0f} s)")


if __name__ == "__main__":
    main()
