"""The keys file, the tenants' upstream fields, and what `facegate check` says about both.

Secrets go in, names come out: no error message, repr, audit line or CLI output may hold
an ailabapi key.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from app.tenants import TenantRegistry, TenantsFileError, UpstreamShare, hash_key
from app.upstream import contract
from app.upstream.keys import KeysFileError, KeysStore, PoolSpec, spec_changes
from tests.unit.test_settings import run_cli

SECRET = "ailab-secret-7f3a9c"


def parse(text: str, tmp_path: Path) -> PoolSpec:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    return PoolSpec.load(path, default_qps=5, default_concurrency=4)


def test_a_keys_file_names_its_keys_with_their_limits_tier_and_weight(tmp_path: Path) -> None:
    (tmp_path / "secret-b").write_text("  second-secret\n")
    spec = parse(
        f"""
[pool]
max_concurrency = 6
low_credits = 250

[keys.a]
key = "{SECRET}"
qps = 2.5
weight = 2

[keys.b]
key_file = "secret-b"
tier = "reserve"
max_concurrency = 1
low_credits = 10
""",
        tmp_path,
    )
    a, b = spec.keys
    assert (a.name, a.qps, a.max_concurrency, a.weight, a.tier, a.low_credits) == ("a", 2.5, 4, 2.0, "primary", 250)
    assert (b.name, b.qps, b.max_concurrency, b.tier, b.low_credits) == ("b", 5, 1, "reserve", 10)
    assert b.secret.reveal() == "second-secret"
    assert (spec.max_concurrency, spec.qps, spec.gated) == (6, 0, True)
    assert SECRET not in repr(spec) and SECRET not in str(a.secret)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "at least one key"),
        ("[keys.a]\nqps = 1\n", "exactly one of key or key_file"),
        (f'[keys.a]\nkey = "{SECRET}"\nkey_file = "x"\n', "exactly one of key or key_file"),
        ('[keys.a]\nkey_file = "missing"\n', "cannot read"),
        (f'[keys.a]\nkey = "{SECRET}"\ntier = "gold"\n', "tier must be one of"),
        (f'[keys.a]\nkey = "{SECRET}"\nqps = 0\n', "qps must be a number > 0"),
        (f'[keys.a]\nkey = "{SECRET}"\nmax_concurrency = 0\n', "max_concurrency must be an integer >= 1"),
        (f'[keys.a]\nkey = "{SECRET}"\nwieght = 2\n', "unknown setting(s) wieght"),
        (f'[keys.a]\nkey = "{SECRET}"\n[keys.b]\nkey = "{SECRET}"\n', "also configured as a"),
        ('[keys."a b"]\nkey = "x"\n', "key name"),
        ('[keys.a]\nkey = "two words"\n', "contains whitespace"),
        (f'[keys.a]\nkey = "{SECRET}"\n[pools]\n', "unknown top-level"),
        (f'[keys.a]\nkey = "{SECRET}"\nqps = ', "invalid TOML"),
    ],
)
def test_a_broken_keys_file_is_one_line_without_the_secret(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(KeysFileError) as failed:
        parse(text, tmp_path)
    assert message in str(failed.value)
    assert SECRET not in str(failed.value)


def test_the_single_key_is_a_pool_of_one_that_is_never_gated() -> None:
    spec = PoolSpec.single(SECRET, qps=5, max_concurrency=5)
    (key,) = spec.keys
    assert (key.name, key.qps, key.max_concurrency, key.shared, spec.gated) == ("default", 5, 5, True, False)


def test_a_reload_keeps_the_old_keys_on_a_broken_edit_and_audits_a_good_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(f'[keys.a]\nkey = "{SECRET}"\n')
    store = KeysStore(PoolSpec.load(path, default_qps=5, default_concurrency=5), path)
    path.write_text("[keys.a]\nkey = ")
    assert not store.reload(force=True)
    assert list(store.spec.names) == ["a"]
    caplog.set_level(logging.INFO, logger="facegate.audit")
    path.write_text(f'[keys.a]\nkey = "{SECRET}-rotated"\nqps = 2\n\n[keys.b]\nkey = "other"\n')
    assert store.reload(force=True)
    assert list(store.spec.names) == ["a", "b"]
    (record,) = [r for r in caplog.records if r.name == "facegate.audit"]
    assert record.__dict__["details"]["keys_changed"] == {"a": ["qps", "secret"]}
    assert record.__dict__["details"]["keys_added"] == ["b"]
    assert SECRET not in json.dumps(record.__dict__["details"])


def test_spec_changes_name_what_changed() -> None:
    old = PoolSpec.single("k", qps=5, max_concurrency=5)
    assert spec_changes(old, old) == {"keys_added": [], "keys_removed": [], "keys_changed": {}, "pool_changed": []}


# --- the tenants' side -------------------------------------------------------------------------


def test_tenant_upstream_fields_and_their_defaults() -> None:
    registry = TenantRegistry.parse(
        {
            "defaults": {"share": 2, "priority": "batch"},
            "tenants": {
                "a": {"key_sha256": hash_key("ka")},
                "b": {"key_sha256": hash_key("kb"), "share": 0.5, "priority": "interactive"},
                "c": {"key_sha256": hash_key("kc"), "upstream_key": "team-c", "upstream_fallback": True},
            },
        }
    )
    assert registry.tenants["a"].upstream == UpstreamShare(2.0, "batch")
    assert registry.tenants["b"].upstream == UpstreamShare(0.5, "interactive")
    assert registry.tenants["c"].upstream == UpstreamShare(2.0, "batch", "team-c", True)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"share": 0}, "share must be a number above 0"),
        ({"share": True}, "share must be a number above 0"),
        ({"priority": "urgent"}, 'priority must be "interactive" or "batch"'),
        ({"upstream_key": "no spaces allowed"}, "upstream_key must name a key"),
        ({"upstream_fallback": "yes"}, "upstream_fallback must be true or false"),
    ],
)
def test_bad_tenant_upstream_fields_are_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(TenantsFileError) as failed:
        TenantRegistry.parse({"tenants": {"a": {"key_sha256": hash_key("k"), **fields}}})
    assert message in str(failed.value)


# --- the balance endpoint's answer (contract) ------------------------------------------------------


def test_balance_is_read_from_either_documented_shape() -> None:
    entry = {"unique_sign": "common", "balance": 42.5}
    other = {"unique_sign": "image_dehazing", "balance": 1000}
    assert contract.credits_balance({"data": [entry, other]}) == 42.5
    assert contract.credits_balance({"data": entry}) == 42.5
    assert contract.credits_balance({"data": [other]}) is None
    error = contract.envelope(request_id="r", status=401, code="ERROR_USER_NOT_EXISTS")
    assert contract.credits_balance({**error, "data": [entry]}) is None


# --- facegate check ----------------------------------------------------------------------------------


def test_check_lists_the_keys_by_name_and_flags_a_tenants_unknown_key(tmp_path: Path) -> None:
    (tmp_path / "keys.toml").write_text(
        f'[keys.main]\nkey = "{SECRET}"\nqps = 3\n\n[keys.team-x]\nkey = "{SECRET}-x"\ntier = "dedicated"\n'
    )
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(
        f'[tenants.x]\nkey_sha256 = ["{hash_key("a")}"]\nupstream_key = "team-x"\n'
        f'[tenants.y]\nkey_sha256 = ["{hash_key("b")}"]\nupstream_key = "main"\n'
    )
    env = {"FACEGATE_UPSTREAM_KEYS_FILE": str(tmp_path / "keys.toml")}
    out = run_cli("check", env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "upstream keys: 2 from" in out.stdout
    assert "main                 primary   3 calls/s" in out.stdout
    assert "team-x               dedicated" in out.stdout
    assert "y: warning: upstream_key 'main' is a primary key that other tenants use too" in out.stderr
    assert SECRET not in out.stdout + out.stderr
    tenants.write_text(f'[tenants.z]\nkey_sha256 = ["{hash_key("c")}"]\nupstream_key = "nosuch"\n')
    out = run_cli("check", env=env, cwd=tmp_path)
    assert out.returncode == 1
    assert "z: upstream_key 'nosuch' is not a key of the pool" in out.stderr


def test_keys_file_and_single_key_are_exclusive(tmp_path: Path) -> None:
    (tmp_path / "keys.toml").write_text(f'[keys.main]\nkey = "{SECRET}"\n')
    env = {"FACEGATE_UPSTREAM_KEYS_FILE": str(tmp_path / "keys.toml"), "FACEGATE_UPSTREAM_API_KEY": SECRET}
    out = run_cli("check", env=env, cwd=tmp_path)
    assert out.returncode == 2
    assert "FACEGATE_UPSTREAM_KEYS_FILE" in out.stderr and SECRET not in out.stderr
