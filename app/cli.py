"""``facegate``: serve | sim | check | keys | upstream | usage | purge | analyze.

Configuration errors end the command with one line on stderr and exit code 2 —
never a traceback, never a secret.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

from pydantic import ValidationError

from app import __version__
from app.settings import Settings, describe_error
from app.tenants import OPERATOR_KEY_PREFIX, TenantRegistry, TenantsFileError, new_key, paste_line

if TYPE_CHECKING:
    from app.client import AnalyzeResult
    from app.purge import Purged
    from app.schema.v1 import AnalysisV1


def fail(message: str, code: int = 2) -> NoReturn:
    print(f"facegate: {message}", file=sys.stderr)
    raise SystemExit(code)


def load_settings(**overrides: object) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
    except ValidationError as exc:
        fail(describe_error(exc))


def banner(settings: Settings, demo_key: str | None) -> str:
    """What ``serve`` says first: where answers come from, where state lives, how to change it."""
    url = f"http://{settings.host}:{settings.port}"
    lines = [f"facegate {__version__} on {url}  (API docs: {url}/docs)"]
    if settings.sandbox:
        lines += [
            "SANDBOX MODE: answers are SIMULATED by the built-in ailabapi simulator; no credits are spent.",
            "  To use the real ailabapi: set FACEGATE_UPSTREAM_API_KEY (or FACEGATE_UPSTREAM_API_KEY_FILE)",
            "  and create tenants in tenants.toml with `facegate keys create --tenant NAME`.",
        ]
        if demo_key:
            lines += [
                f"  Demo tenant key (shown once): {demo_key}",
                f'  Try: curl -H "Authorization: Bearer {demo_key}" -F image=@photo.jpg {url}/v1/faces/analyze',
            ]
        else:
            lines.append(f"  Tenants from {settings.tenants_file}.")
    else:
        lines.append(f"Upstream: {settings.upstream_url} (real ailabapi; every cache miss spends a credit).")
        lines.append(f"Tenants: {settings.tenants_file}")
    if settings.redis_url:
        lines.append("State: Redis (cache, quotas and request collapsing shared by all replicas).")
    else:
        lines.append("State: in memory (FACEGATE_REDIS_URL not set): exact for this one process only.")
    return "\n".join(lines)


def _http_protocol(settings: Settings) -> type[object] | str:
    """httptools with a bounded request head (``app/httpserver.py``); h11 if httptools is missing."""
    try:
        from app.httpserver import HEAD_TIMEOUT_S, BoundedHttpToolsProtocol
    except ImportError:
        return "h11"
    # A request's head never gets longer than its body may take (worker processes keep the default).
    BoundedHttpToolsProtocol.head_timeout_s = min(HEAD_TIMEOUT_S, settings.body_timeout_s)
    return BoundedHttpToolsProtocol


def tune_allocator() -> None:
    """Keep glibc from holding on to upload-sized memory (Linux/glibc only; a no-op elsewhere).

    Under many concurrent uploads, bodies and parser buffers are short-lived blocks of tens
    of KiB spread over threads: by default glibc serves them from per-thread arenas and keeps
    the freed memory, so RSS ratchets up. Two arenas, mmap for blocks of 512 KiB or more (given
    back on free; 64 KiB made every body chunk an mmap/munmap pair and cost 40 % of hit
    throughput, and 64 or 128 KiB lowered the 200-upload peak by no more than the noise:
    bench/HISTORY.md) and an early trim keep the worker's peak close to what is live. The same
    as MALLOC_ARENA_MAX=2 MALLOC_MMAP_THRESHOLD_=524288 MALLOC_TRIM_THRESHOLD_=131072, which an
    operator may still set instead (the environment wins: we only tune what is unset).
    """
    import ctypes
    import ctypes.util
    import os

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    for env, param, value in (
        ("MALLOC_ARENA_MAX", m_arena_max, 2),
        ("MALLOC_MMAP_THRESHOLD_", m_mmap_threshold, 512 * 1024),
        ("MALLOC_TRIM_THRESHOLD_", m_trim_threshold, 128 * 1024),
    ):
        if env not in os.environ:
            mallopt(param, value)


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from app.main import create_app
    from app.observability import configure_logging

    settings = load_settings(host=args.host, port=args.port, workers=args.workers)
    configure_logging(settings.log_level, settings.log_format)
    tune_allocator()
    demo_key = None
    if settings.sandbox and not settings.tenants_file.exists():
        demo_key = new_key()
    else:
        try:
            TenantRegistry.load(settings.tenants_file)
        except TenantsFileError as exc:
            fail(str(exc))
    print(banner(settings, demo_key), file=sys.stderr, flush=True)
    common = {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": math.ceil(settings.shutdown_grace_s),  # int() would turn 0.5 s into "none"
        "server_header": False,
        "proxy_headers": False,
        "http": _http_protocol(settings),
    }
    if settings.workers > 1 and not settings.sandbox:
        _multiprocess_metrics_dir()
        uvicorn.run("app.main:create_app", factory=True, workers=settings.workers, **common)  # type: ignore[arg-type]
        return
    config = uvicorn.Config(create_app(settings, demo_key=demo_key), **common)  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        raise SystemExit(3)


def _multiprocess_metrics_dir() -> None:
    """Several workers share one metrics directory (prometheus_client's multiprocess mode)."""
    import os
    import tempfile
    from pathlib import Path

    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="facegate-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    for stale in Path(path).glob("*.db"):  # values of a previous run would be summed in
        stale.unlink()


def cmd_check(args: argparse.Namespace) -> None:
    settings = load_settings()
    ok = True
    registry: TenantRegistry | None = None
    print(json.dumps(settings.masked(), indent=2, sort_keys=True))
    try:
        registry = TenantRegistry.load(settings.tenants_file)
        print(f"tenants: {len(registry)} tenant(s) in {settings.tenants_file}")
    except TenantsFileError as exc:
        if settings.sandbox and not settings.tenants_file.exists():
            print("tenants: none (sandbox mode will create a demo tenant)")
        else:
            print(f"tenants: {exc}", file=sys.stderr)
            ok = False
    print("upstream: " + ("SANDBOX (simulator)" if settings.sandbox else settings.upstream_url))
    if not settings.sandbox:
        ok = _check_keys(settings, registry) and ok
    if not ok:
        raise SystemExit(1)


def _check_keys(settings: Settings, registry: TenantRegistry | None) -> bool:
    """The key pool (names and limits only) and every tenant's own key naming a key of it."""
    from app.pool_report import describe_spec, pool_spec
    from app.upstream.keys import KeysFileError

    try:
        spec = pool_spec(settings)
    except KeysFileError as exc:
        print(f"upstream keys: {exc}", file=sys.stderr)
        return False
    for line in describe_spec(spec):
        print(line)
    ok = True
    if not any(k.shared for k in spec.keys):
        print("upstream keys: warning: every key is dedicated; tenants without upstream_key get 503", file=sys.stderr)
    for tenant in registry.tenants.values() if registry is not None else ():
        own = tenant.upstream.upstream_key
        if own is None:
            continue
        found = spec.get(own)
        if found is None:
            print(f"tenants: {tenant.name}: upstream_key {own!r} is not a key of the pool", file=sys.stderr)
            ok = False
        elif found.shared:
            print(
                f"tenants: {tenant.name}: warning: upstream_key {own!r} is a {found.tier} key that other tenants "
                'use too (make it tier = "dedicated" to keep it for this tenant)',
                file=sys.stderr,
            )
    return ok


def cmd_keys_create(args: argparse.Namespace) -> None:
    table = f"operators.{args.operator}" if args.operator else f"tenants.{args.tenant}"
    key = new_key(OPERATOR_KEY_PREFIX) if args.operator else new_key()
    print(key)
    print(f"# add under [{table}] in your tenants file (the key above is shown only once):", file=sys.stderr)
    print(f"[{table}]", file=sys.stderr)
    print(paste_line(key), file=sys.stderr)


def cmd_keys_hash(args: argparse.Namespace) -> None:
    key = sys.stdin.readline().strip()
    if not key:
        fail("give the key on standard input")
    print(paste_line(key))


def cmd_sim(args: argparse.Namespace) -> None:
    from app import sim

    argv = ["--host", args.host, "--port", str(args.port)]
    if args.shape:
        argv += ["--shape", args.shape]
    if args.faces:
        argv += ["--faces", args.faces]
    sim.main(argv)


def cmd_upstream_status(args: argparse.Namespace) -> None:
    from app.pool_report import print_status

    settings = load_settings()
    asyncio.run(print_status(settings, as_json=args.json))


def cmd_usage(args: argparse.Namespace) -> None:
    from datetime import date

    from app.usage_report import MAX_HISTORY_DAYS, print_history, print_usage, today_utc

    settings = load_settings()
    if args.first is None and args.last is None and not args.csv:
        asyncio.run(print_usage(settings, args.tenant, as_json=args.json))
        return
    try:
        last = date.fromisoformat(args.last) if args.last else today_utc()
        first = date.fromisoformat(args.first) if args.first else last
    except ValueError:
        fail("--from and --to are UTC days: YYYY-MM-DD")
    if first > last or (last - first).days >= MAX_HISTORY_DAYS:
        fail(f"--from must not be after --to, and at most {MAX_HISTORY_DAYS} days apart")
    asyncio.run(print_history(settings, args.tenant, first, last, as_csv=args.csv, as_json=args.json))


def cmd_purge(args: argparse.Namespace) -> None:
    import re

    if args.sha256 is None and args.tenant is None:
        fail("give --tenant NAME (everything of a tenant), --sha256 HASH (one image everywhere), or both")
    if args.sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", args.sha256):
        fail("--sha256 must be 64 lowercase hex characters")
    if args.tenant is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", args.tenant):
        fail("tenant names are 1-64 letters, digits, '_' or '-'")
    settings = load_settings()
    if not settings.redis_url:
        fail(
            "without FACEGATE_REDIS_URL the cache lives in the serving process: ask it "
            "(DELETE /admin/tenants/NAME/analyses or /admin/analyses/HASH with an operator key)"
        )
    try:
        done = asyncio.run(_purge(settings, args.tenant, args.sha256))
    except _Unreachable:
        fail("Redis is unreachable; nothing is promised, run it again", 1)
    print(
        json.dumps(
            {"deleted": done.deleted, "replicas": {"told": done.delivery.told, "confirmed": done.delivery.confirmed}}
        )
    )


class _Unreachable(Exception):
    pass


async def _purge(settings: Settings, tenant: str | None, sha256: str | None) -> Purged:
    """The same deletion the admin routes do, straight on Redis; replicas are told and confirm."""
    import getpass

    from app import redisconn
    from app.cache import CacheError, RedisCache
    from app.purge import Purger, RedisIndex, RedisInvalidator

    client = redisconn.connect(settings)
    health = redisconn.RedisHealth(timeout_s=5.0)
    prefix = settings.redis_prefix
    purger = Purger(
        RedisCache(client, health, prefix), RedisIndex(client, health, prefix), RedisInvalidator(client, prefix)
    )
    actor = f"cli:{getpass.getuser()}"
    try:
        if sha256 is None:
            assert tenant is not None
            return await purger.purge_tenant(tenant, actor=actor)
        if tenant is not None:
            return await purger.delete_analysis(settings.cache_scope, tenant, sha256, actor=actor)
        try:
            known = TenantRegistry.load(settings.tenants_file).tenants
        except TenantsFileError:
            known = {}
        return await purger.purge_hash(sha256, known, actor=actor)
    except CacheError:
        raise _Unreachable() from None
    finally:
        await client.aclose()


# --- facegate analyze: the client side, through app.client (no server code imported) -------

ANALYZE_EPILOG = """\
The key comes from --key or $FACEGATE_KEY (prefer the variable: arguments show up in `ps`);
the URL from --url or $FACEGATE_URL (default http://127.0.0.1:8000).
Each image is hashed locally and looked up by its SHA-256 first; only images facegate has not
analyzed before are uploaded (--no-lookup uploads every one).
Output: a table per image on stdout; with --json one v1 JSON document per line, in the order
given, for the images that succeeded. Failures go to stderr with facegate's problem code.
Exit status: 0 all images analyzed, 1 at least one failed, 2 usage error (no key, bad URL)."""

#: After these, the remaining images would fail the same way: stop instead of repeating it.
_FATAL_CODES = frozenset({"unauthorized", "connect_error", "upstream_auth", "upstream_credits"})


class _Progress:
    """``[3/20] name`` on one stderr line, redrawn in place; cleared before anything else prints."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled, self.shown = total, 0, enabled, False

    def step(self, name: str) -> None:
        self.done += 1
        if self.enabled:
            sys.stderr.write(f"\r\x1b[K[{self.done}/{self.total}] {name[-60:]}")
            sys.stderr.flush()
            self.shown = True

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self.shown = False


def _attr_text(attr: object) -> str:
    label = getattr(attr, "label", None)
    if label is None:
        return "-"
    confidence = getattr(attr, "confidence", None)
    return f"{label} {round(confidence * 100)}%" if isinstance(confidence, float) else str(label)


def _cache_word(header: str | None, cached: bool) -> str:
    parts = {p.strip() for p in (header or "").split(";")}
    if "hit" in parts or (not header and cached):
        return "hit"
    if "collapsed" in parts:
        return "collapsed"
    return "forced" if "fwd=request" in parts else "miss"


def _face_rows(analysis: AnalysisV1) -> list[list[str]]:
    rows = [["#", "box x,y wxh", "age", "gender", "emotion", "beauty", "smile", "glasses", "mask", "hat"]]
    for i, face in enumerate(analysis.faces, 1):
        b = face.box
        rows.append(
            [
                str(i),
                f"{b.x},{b.y} {b.width}x{b.height}",
                "-" if face.age is None else str(face.age),
                _attr_text(face.gender),
                _attr_text(face.emotion or face.expression),
                "-" if face.beauty is None else str(face.beauty),
                "-" if face.smile is None else str(face.smile),
                _attr_text(face.eyes.glasses if face.eyes else None),
                _attr_text(face.mask),
                _attr_text(face.hat.style if face.hat else None),
            ]
        )
    return rows


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _human(name: str, result: AnalyzeResult) -> str:
    a = result.analysis
    faces = f"{len(a.faces)} face{'s' if len(a.faces) != 1 else ''}"
    head = [f"{name}: {faces}", f"{a.image.width}x{a.image.height} {a.image.format}"]
    word = _cache_word(result.cache_status, a.source.cached)
    head.append(f"cache {word} (by hash, not uploaded)" if result.from_lookup else f"cache {word}")
    if a.source.provider == "simulator":
        head.append("SIMULATED")
    daily = result.rate_limits.get("daily")
    if daily is not None:
        head.append(f"daily quota {daily.remaining}" + (f"/{daily.limit}" if daily.limit else "") + " left")
    text = " · ".join(head)
    return text + ("\n" + _table(_face_rows(a)) if a.faces else "")


async def _analyze_all(args: argparse.Namespace) -> int:
    from app.client import AsyncFacegateClient, FacegateError, RetryPolicy

    try:
        client = AsyncFacegateClient(
            args.url, args.key, timeout=args.timeout, retry=RetryPolicy(), lookup_first=not args.no_lookup
        )
    except ValueError as exc:
        fail(str(exc).replace("pass key=...", "pass --key"))
    progress = _Progress(len(args.images), args.progress or (len(args.images) > 1 and sys.stderr.isatty()))
    gate = asyncio.Semaphore(args.concurrency)
    stop = asyncio.Event()
    failures: dict[str, int] = {}

    async def one(path: str) -> AnalyzeResult | FacegateError | None:
        async with gate:
            if stop.is_set():
                return None
            try:
                return await client.analyze_detailed(path, landmarks=args.landmarks, force=args.force)
            except FacegateError as exc:
                if exc.code in _FATAL_CODES:
                    stop.set()
                return exc
            except OSError as exc:
                return FacegateError("file_unreadable", exc.strerror or type(exc).__name__)
            finally:
                progress.step(path)

    async with client:
        # The first image alone: a wrong key or URL then shows once, not once per image.
        tasks = [asyncio.ensure_future(one(args.images[0]))]
        await asyncio.wait(tasks)
        tasks += [asyncio.ensure_future(one(path)) for path in args.images[1:]]
        for path, task in zip(args.images, tasks, strict=True):
            outcome = await task
            progress.clear()
            if outcome is None:
                failures["skipped"] = failures.get("skipped", 0) + 1
                print(f"facegate: {path}: skipped after the error above", file=sys.stderr)
            elif isinstance(outcome, FacegateError):
                failures[outcome.code] = failures.get(outcome.code, 0) + 1
                print(f"facegate: {path}: {outcome}", file=sys.stderr)
            elif args.json:
                print(outcome.analysis.model_dump_json())
            else:
                print(_human(path, outcome))
            sys.stdout.flush()
    progress.clear()
    if failures:
        failed = sum(failures.values())
        summary = ", ".join(f"{code} x{n}" for code, n in sorted(failures.items()))
        print(f"facegate: {failed} of {len(args.images)} image(s) failed: {summary}", file=sys.stderr)
        return 1
    return 0


def cmd_analyze(args: argparse.Namespace) -> None:
    if args.concurrency < 1:
        fail("--concurrency must be at least 1")
    try:
        code = asyncio.run(_analyze_all(args))
    except BrokenPipeError:  # `facegate analyze ... | head`: the reader left, which is no error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    if code:
        raise SystemExit(code)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="facegate", description="A gateway in front of ailabapi's Face Analyzer Advanced.")
    p.add_argument("--version", action="version", version=f"facegate {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway (sandbox simulator when no ailabapi key is set)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int)
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check", help="validate the configuration and tenants file; print the effective config")
    check.set_defaults(func=cmd_check)

    keys = sub.add_parser("keys", help="tenant keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="print a new key once, and the line to paste in the tenants file")
    who = create.add_mutually_exclusive_group(required=True)
    who.add_argument("--tenant", help="a tenant key (fg_...)")
    who.add_argument("--operator", help="an operator (admin) key (fgop_...): /admin routes, purges")
    create.set_defaults(func=cmd_keys_create)
    hashed = keys_sub.add_parser("hash", help="read a key on stdin, print its key_sha256 line")
    hashed.set_defaults(func=cmd_keys_hash)

    sim = sub.add_parser("sim", help="run the ailabapi simulator")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8081)
    sim.add_argument("--shape", choices=["tencent", "list"])
    sim.add_argument("--faces", choices=["detect", "hash"], help="face boxes from a detector or the image hash")
    sim.set_defaults(func=cmd_sim)

    purge = sub.add_parser(
        "purge",
        help="delete cached analyses: all of a tenant, one image everywhere, or one image of a tenant (Redis)",
    )
    purge.add_argument("--tenant", help="the tenant whose cached data goes (alone: all of it)")
    purge.add_argument("--sha256", help="the image's SHA-256 (alone: in every tenant's scope and the shared one)")
    purge.set_defaults(func=cmd_purge)

    upstream = sub.add_parser("upstream", help="the pool of ailabapi keys")
    upstream_sub = upstream.add_subparsers(dest="upstream_command", required=True)
    status = upstream_sub.add_parser(
        "status", help="each key's state, calls in flight, cooldown and balance, and the queue (reads Redis)"
    )
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_upstream_status)

    usage = sub.add_parser(
        "usage", help="print tenants' limits and usage, or with --from/--to their history per UTC day (reads Redis)"
    )
    usage.add_argument("--tenant")
    usage.add_argument("--json", action="store_true")
    usage.add_argument("--from", dest="first", metavar="YYYY-MM-DD", help="history: first UTC day (default: --to)")
    usage.add_argument("--to", dest="last", metavar="YYYY-MM-DD", help="history: last UTC day (default: today)")
    usage.add_argument("--csv", action="store_true", help="history as CSV: one row per tenant and day (finance)")
    usage.set_defaults(func=cmd_usage)

    analyze = sub.add_parser(
        "analyze",
        help="analyze images through a running facegate (the client side)",
        epilog=ANALYZE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    analyze.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG, PNG or BMP files")
    analyze.add_argument("--url", help="facegate's base URL (default $FACEGATE_URL or http://127.0.0.1:8000)")
    analyze.add_argument("--key", help="tenant key (default $FACEGATE_KEY)")
    analyze.add_argument("--json", action="store_true", help="print the v1 JSON, one document per line")
    analyze.add_argument("--landmarks", action="store_true", help="include landmarks and pupils (list shape)")
    analyze.add_argument(
        "--force",
        action="store_true",
        help="a fresh, billable analysis even if cached (X-Facegate-Force; the tenant needs allow_force)",
    )
    analyze.add_argument(
        "--no-lookup",
        action="store_true",
        help="upload every image; by default each is hashed and looked up first, and uploaded only if unknown",
    )
    analyze.add_argument("--concurrency", type=int, default=4, help="images in flight at once (default 4)")
    analyze.add_argument("--timeout", type=float, default=60.0, help="seconds per attempt (default 60)")
    analyze.add_argument("--progress", action="store_true", help="show progress on stderr even when not a TTY")
    analyze.set_defaults(func=cmd_analyze)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.func is cmd_keys_create:
        import re

        name = args.operator or args.tenant
        if not re.match(r"^[A-Za-z0-9_-]{1,64}$", name):
            fail(f"{'operator' if args.operator else 'tenant'} names are 1-64 letters, digits, '_' or '-'")
    args.func(args)


if __name__ == "__main__":
    main()
