"""Settings and the CLI's configuration handling: one clear line for bad config, secrets masked."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.settings import Settings, describe_error
from app.tenants import TenantRegistry, hash_key

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, stdin: str | None = None):
    full = {k: v for k, v in os.environ.items() if not k.startswith("FACEGATE_")}
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        env=full,
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        input=stdin,
        timeout=60,
        check=False,
    )


def test_defaults_are_the_sandbox() -> None:
    s = Settings(_env_file=None)
    assert s.sandbox and s.redis_url == "" and s.cache_scope == "tenant"


def test_key_file_variant(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("  the-key\n")
    s = Settings(upstream_api_key_file=key_file, _env_file=None)
    assert s.upstream_api_key is not None and s.upstream_api_key.get_secret_value() == "the-key"
    assert not s.sandbox


def test_bad_values_are_named_by_variable_without_echoing_them() -> None:
    with pytest.raises(ValidationError) as info:
        Settings(redis_url="http://secret-host", cache_scope="everyone", _env_file=None)
    line = describe_error(info.value)
    assert "FACEGATE_REDIS_URL" in line and "FACEGATE_CACHE_SCOPE" in line
    assert "secret-host" not in line and "\n" not in line


def test_masked_hides_secrets() -> None:
    s = Settings(upstream_api_key="k-123", redis_url="redis://user:pw@redis:6379/0", _env_file=None)
    shown = str(s.masked())
    assert "k-123" not in shown and "pw" not in shown and "redis:6379/0" in shown


def test_invalid_config_fails_start_with_one_line(tmp_path: Path) -> None:
    out = run_cli("serve", env={"FACEGATE_PORT": "not-a-port"}, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "FACEGATE_PORT" in out.stderr and "Traceback" not in out.stderr


def test_broken_tenants_file_fails_start_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "tenants.toml").write_text("[tenants.x]\nkey_sha256 = ['nothex']\n")
    out = run_cli("serve", env={"FACEGATE_UPSTREAM_API_KEY": "k"}, cwd=tmp_path)
    assert out.returncode == 2
    assert "key_sha256" in out.stderr and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0


def test_keys_create_prints_the_key_once_and_the_line_to_paste(tmp_path: Path) -> None:
    out = run_cli("keys", "create", "--tenant", "checkout")
    assert out.returncode == 0
    key = out.stdout.strip()
    assert re.fullmatch(r"fg_[A-Za-z0-9_-]{43}", key)
    assert f'key_sha256 = ["{hash_key(key)}"]' in out.stderr
    assert key not in out.stderr
    # What it told us to paste makes a working tenants file.
    (tmp_path / "tenants.toml").write_text(out.stderr.split("\n", 1)[1])
    registry = TenantRegistry.load(tmp_path / "tenants.toml")
    tenant = registry.authenticate(key)
    assert tenant is not None and tenant.name == "checkout"
    hashed = run_cli("keys", "hash", stdin=key + "\n")
    assert hashed.stdout.strip() == f'key_sha256 = ["{hash_key(key)}"]'


def test_keys_create_operator_makes_an_admin_key_not_a_tenant_key(tmp_path: Path) -> None:
    out = run_cli("keys", "create", "--operator", "ops")
    assert out.returncode == 0
    key = out.stdout.strip()
    assert re.fullmatch(r"fgop_[A-Za-z0-9_-]{43}", key)
    assert "[operators.ops]" in out.stderr
    (tmp_path / "tenants.toml").write_text(out.stderr.split("\n", 1)[1])
    registry = TenantRegistry.load(tmp_path / "tenants.toml")
    operator = registry.authenticate_operator(key)
    assert operator is not None and operator.name == "ops"
    assert registry.authenticate(key) is None
    assert run_cli("keys", "create", "--operator", "a b").returncode == 2
    assert run_cli("keys", "create", "--operator", "x", "--tenant", "y").returncode == 2


def test_check_validates_and_prints_effective_config(tmp_path: Path) -> None:
    (tmp_path / "tenants.toml").write_text(f'[tenants.a]\nkey_sha256 = ["{hash_key("x")}"]\n')
    out = run_cli("check", env={"FACEGATE_UPSTREAM_API_KEY": "very-secret"}, cwd=tmp_path)
    assert out.returncode == 0
    assert "very-secret" not in out.stdout + out.stderr
    assert "1 tenant(s)" in out.stdout


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in Settings.model_fields if f"FACEGATE_{name.upper()}" not in readme]
    # Settings documented in a combined row ("A / B", "_FILE") are found by their own names too.
    assert not missing, f"README's configuration table lacks: {missing}"


def test_readme_documents_every_error_code() -> None:
    from app.errors import CATALOGUE

    readme = (ROOT / "README.md").read_text()
    missing = [code for code, spec in CATALOGUE.items() if f"| `{code}` | {spec.status} |" not in readme]
    assert not missing, f"README's error table lacks (or has the wrong status for): {missing}"


@pytest.mark.parametrize(
    ("url", "kind", "nodes", "master"),
    [
        ("redis://h:1/0", "single", (), ""),
        ("unix:///run/redis.sock", "single", (), ""),
        ("redis+cluster://a:7000,b:7001,c", "cluster", (("a", 7000), ("b", 7001), ("c", 6379)), ""),
        ("rediss+cluster://u:p@a:7000/?ssl_cert_reqs=none", "cluster", (("a", 7000),), ""),
        ("redis+sentinel://s1,s2:26380/mymaster", "sentinel", (("s1", 26379), ("s2", 26380)), "mymaster"),
        ("rediss+sentinel://:p@[::1]:5000/m/2", "sentinel", (("::1", 5000),), "m"),
    ],
)
def test_redis_url_forms(url: str, kind: str, nodes: tuple[tuple[str, int], ...], master: str) -> None:
    from app.redisurl import parse

    target = parse(url)
    assert (target.kind, target.nodes, target.master) == (kind, nodes, master)
    if kind != "single":
        assert target.options_url.startswith("rediss://" if url.startswith("rediss") else "redis://")


@pytest.mark.parametrize(
    "url",
    [
        "http://u:hunter2@h",
        "redis+sentinel://u:hunter2@s1:26379",  # no master name
        "redis+sentinel://u:hunter2@s1:99999/m",
        "redis+sentinel://u:hunter2@s1/m/zero",
        "redis+cluster://u:hunter2@a:1/3",  # a cluster has only db 0
        "redis+cluster://u:hunter2@a:1,:2",
        "redis://u:hunter2@h:1/0?socket_timeout=soon",
    ],
)
def test_bad_redis_urls_are_one_line_without_the_password(url: str) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(redis_url=url, _env_file=None)
    line = describe_error(info.value)
    assert line.startswith("invalid configuration: FACEGATE_REDIS_URL: ") and "hunter2" not in line
    assert "\n" not in line


def test_sentinel_settings_are_masked_in_check(tmp_path: Path) -> None:
    (tmp_path / "tenants.toml").write_text(f'[tenants.a]\nkey_sha256 = ["{hash_key("x")}"]\n')
    env = {
        "FACEGATE_REDIS_URL": "redis+sentinel://app:data-secret@s1:26379,s2:26379/mymaster?password=query-secret",
        "FACEGATE_REDIS_SENTINEL_PASSWORD": "sentinel-secret",
    }
    out = run_cli("check", env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for secret in ("data-secret", "query-secret", "sentinel-secret"):
        assert secret not in out.stdout + out.stderr
    assert "s1:26379,s2:26379/mymaster" in out.stdout
