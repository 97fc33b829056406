"""``facegate``: serve | sim | check | keys | usage.

Configuration errors end the command with one line on stderr and exit code 2 —
never a traceback, never a secret.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import NoReturn

from pydantic import ValidationError

from app import __version__
from app.settings import Settings, describe_error
from app.tenants import TenantRegistry, TenantsFileError, new_key, paste_line


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


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from app.main import create_app
    from app.observability import configure_logging

    settings = load_settings(host=args.host, port=args.port, workers=args.workers)
    configure_logging(settings.log_level, settings.log_format)
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
        "timeout_graceful_shutdown": int(settings.shutdown_grace_s),
        "server_header": False,
        "proxy_headers": False,
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
    if not ok:
        raise SystemExit(1)


def cmd_keys_create(args: argparse.Namespace) -> None:
    key = new_key()
    print(key)
    print(
        f"# add under [tenants.{args.tenant}] in your tenants file (the key above is shown only once):", file=sys.stderr
    )
    print(f"[tenants.{args.tenant}]", file=sys.stderr)
    print(paste_line(key), file=sys.stderr)


def cmd_keys_hash(args: argparse.Namespace) -> None:
    key = sys.stdin.readline().strip()
    if not key:
        fail("give the key on standard input")
    print(paste_line(key))


def cmd_sim(args: argparse.Namespace) -> None:
    from app.upstream import sim

    argv = ["--host", args.host, "--port", str(args.port)]
    if args.shape:
        argv += ["--shape", args.shape]
    sim.main(argv)


def cmd_usage(args: argparse.Namespace) -> None:
    from app.usage_report import print_usage

    settings = load_settings()
    asyncio.run(print_usage(settings, args.tenant, as_json=args.json))


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
    create.add_argument("--tenant", required=True)
    create.set_defaults(func=cmd_keys_create)
    hashed = keys_sub.add_parser("hash", help="read a key on stdin, print its key_sha256 line")
    hashed.set_defaults(func=cmd_keys_hash)

    sim = sub.add_parser("sim", help="run the ailabapi simulator")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8081)
    sim.add_argument("--shape", choices=["tencent", "list"])
    sim.set_defaults(func=cmd_sim)

    usage = sub.add_parser("usage", help="print tenants' limits and usage (reads Redis)")
    usage.add_argument("--tenant")
    usage.add_argument("--json", action="store_true")
    usage.set_defaults(func=cmd_usage)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if getattr(args, "tenant", None) is not None and args.func is cmd_keys_create:
        import re

        if not re.match(r"^[A-Za-z0-9_-]{1,64}$", args.tenant):
            fail("tenant names are 1-64 letters, digits, '_' or '-'")
    args.func(args)


if __name__ == "__main__":
    main()
