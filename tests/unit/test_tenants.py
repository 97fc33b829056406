"""The tenants file: parsing, limits, key auth, and reload that never locks tenants out."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from app.tenants import (
    DEFAULT_LIMITS,
    OPERATOR_KEY_PREFIX,
    Limits,
    TenantRegistry,
    TenantsFileError,
    TenantStore,
    hash_key,
    new_key,
    paste_line,
)

K1, K2, K3 = new_key(), new_key(), new_key()


def parse(text: str) -> TenantRegistry:
    import tomllib

    return TenantRegistry.parse(tomllib.loads(text))


def test_defaults_inherited_and_overridden_and_unlimited() -> None:
    reg = parse(
        f"""
        [defaults]
        rate_per_s = 5
        burst = 7
        daily_quota = 100
        monthly_quota = "unlimited"

        [tenants.checkout]
        {paste_line(K1)}
        daily_quota = 5000

        [tenants.batch]
        key_sha256 = "{hash_key(K2)}"
        daily_quota = "unlimited"
        rate_per_s = 0.5
        """
    )
    assert reg.tenants["checkout"].limits == Limits(5.0, 7, 5000, None)
    assert reg.tenants["batch"].limits == Limits(0.5, 7, None, None)
    assert reg.authenticate(K1) is reg.tenants["checkout"]
    assert reg.authenticate(K2) is reg.tenants["batch"]


def test_builtin_defaults_when_the_file_has_none() -> None:
    reg = parse(f"[tenants.a]\n{paste_line(K1)}\n")
    d = DEFAULT_LIMITS
    assert reg.tenants["a"].limits == Limits(
        float(d["rate_per_s"]), int(d["burst"]), int(d["daily_quota"]), int(d["monthly_quota"])
    )


def test_several_keys_are_one_tenant() -> None:
    reg = parse(f'[tenants.a]\nkey_sha256 = ["{hash_key(K1)}", "{hash_key(K2).upper()}"]\n')
    assert reg.authenticate(K1) is reg.authenticate(K2) is reg.tenants["a"]
    assert reg.authenticate(K3) is None
    assert reg.authenticate("") is None
    assert reg.authenticate(None) is None
    assert reg.authenticate("x" * 10_000) is None


def test_disabled_tenant_cannot_authenticate() -> None:
    reg = parse(f"[tenants.a]\n{paste_line(K1)}\ndisabled = true\n[tenants.b]\n{paste_line(K2)}\n")
    assert reg.authenticate(K1) is None
    assert reg.authenticate(K2) is not None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[tenants.a]\nkey_sha256 = []\n", "at least one key hash"),
        ("[tenants.a]\nkey_sha256 = ['abc']\n", "64 hex"),
        (f"[tenants.a]\n{paste_line(K1)}\n[tenants.b]\n{paste_line(K1)}\n", "also used by a"),
        (f"[tenants.a]\n{paste_line(K1)}\ndaily_qouta = 5\n", "unknown setting(s) daily_qouta"),
        (f"[tenant.a]\n{paste_line(K1)}\n", "unknown top-level setting(s) tenant"),
        ("[defaults]\nburts = 5\n", "[defaults]: unknown setting(s) burts"),
        (f'[tenants."a b"]\n{paste_line(K1)}\n', "tenant name"),
        (f'[tenants."a{{x}}"]\n{paste_line(K1)}\n', "tenant name"),  # braces would break the {tenant} hash tag
        (f"[tenants.a]\n{paste_line(K1)}\nrate_per_s = 0\n", "rate_per_s"),
        (f"[tenants.a]\n{paste_line(K1)}\nrate_per_s = -1\n", "rate_per_s"),
        (f"[tenants.a]\n{paste_line(K1)}\nrate_per_s = inf\n", "rate_per_s"),
        (f"[tenants.a]\n{paste_line(K1)}\nrate_per_s = nan\n", "rate_per_s"),
        (f"[tenants.a]\n{paste_line(K1)}\nrate_per_s = true\n", "rate_per_s"),
        (f"[tenants.a]\n{paste_line(K1)}\nburst = 0\n", "burst"),
        (f"[tenants.a]\n{paste_line(K1)}\nburst = 2.5\n", "burst"),
        (f"[tenants.a]\n{paste_line(K1)}\ndaily_quota = -1\n", "quotas"),
        (f"[tenants.a]\n{paste_line(K1)}\ndaily_quota = 'lots'\n", "quotas"),
        (f"[tenants.a]\n{paste_line(K1)}\nmonthly_quota = 1.5\n", "quotas"),
    ],
)
def test_bad_files_are_refused_with_one_line(text: str, message: str) -> None:
    with pytest.raises(TenantsFileError) as err:
        parse(text)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_zero_quota_is_allowed_and_means_no_billable_calls() -> None:
    reg = parse(f"[tenants.a]\n{paste_line(K1)}\ndaily_quota = 0\n")
    assert reg.tenants["a"].limits.daily_quota == 0


def write(path: Path, text: str) -> None:
    path.write_text(text)


def test_store_reloads_on_change_keeps_old_registry_on_a_broken_edit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tenants.toml"
    write(path, f"[tenants.a]\n{paste_line(K1)}\ndaily_quota = 5\n")
    told: list[bool] = []
    store = TenantStore(path, TenantRegistry.load(path), told.append)
    assert store.reload() is False, "unchanged file: nothing to do"
    assert told == []

    write(path, f"[tenants.a]\n{paste_line(K1)}\n{paste_line(K2).replace('key_sha256', '#')}\ndaily_quota = 50\n")
    assert store.reload() is True
    assert store.registry.tenants["a"].limits.daily_quota == 50

    # Rotation: a new key added, the old one removed.
    write(path, f"[tenants.a]\n{paste_line(K2)}\ndaily_quota = 50\n")
    assert store.reload() is True
    assert store.registry.authenticate(K1) is None
    assert store.registry.authenticate(K2) is not None

    with caplog.at_level(logging.ERROR, logger="facegate.tenants"):
        write(path, "[tenants.a\nthis is not toml")
        assert store.reload() is False
        assert store.registry.authenticate(K2) is not None, "a typo must not lock every tenant out"
        path.write_bytes(b"[tenants.a]\nkey_sha256 = ['\xff\xfe']\n")  # not UTF-8
        assert store.reload() is False
        path.unlink()
        assert store.reload() is False
    assert store.registry.authenticate(K2) is not None
    assert "keeping the previous registry" in caplog.text
    assert K2 not in caplog.text
    assert told == [True, True, False, False, False], "every attempt's result reaches the metrics"

    write(path, f"[tenants.b]\n{paste_line(K3)}\n")
    assert store.reload() is True
    assert store.registry.authenticate(K3) is not None
    assert store.registry.authenticate(K2) is None


def test_forced_reload_sees_an_edit_that_kept_size_and_mtime(tmp_path: Path) -> None:
    """What SIGHUP is for: an edit the stamp cannot see (same size, same mtime, same inode)."""
    path = tmp_path / "tenants.toml"
    write(path, f"[tenants.a]\n{paste_line(K1)}\ndaily_quota = 5\n")
    store = TenantStore(path, TenantRegistry.load(path))
    st = os.stat(path)
    with path.open("r+") as fh:  # in place: same inode
        fh.write(f"[tenants.a]\n{paste_line(K1)}\ndaily_quota = 7\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert store.reload() is False
    assert store.registry.tenants["a"].limits.daily_quota == 5
    assert store.reload(force=True) is True
    assert store.registry.tenants["a"].limits.daily_quota == 7


def test_load_errors_name_the_file_not_a_traceback(tmp_path: Path) -> None:
    with pytest.raises(TenantsFileError, match="not found"):
        TenantRegistry.load(tmp_path / "missing.toml")


# --- operators (admin keys) ---------------------------------------------------------------

OP1 = new_key(OPERATOR_KEY_PREFIX)


def test_operators_authenticate_apart_from_tenants() -> None:
    reg = parse(
        f"[tenants.a]\n{paste_line(K1)}\n[operators.ops]\n{paste_line(OP1)}\n[operators.old]\n{paste_line(K3)}\n"
    )
    assert OP1.startswith("fgop_")
    assert reg.authenticate_operator(OP1) is reg.operators["ops"]
    assert reg.authenticate(OP1) is None, "an operator key is no tenant key"
    assert reg.authenticate_operator(K1) is None, "a tenant key is no operator key"
    assert reg.authenticate_operator(None) is None
    assert reg.authenticate_operator("x" * 10_000) is None
    assert sorted(reg.operators) == ["old", "ops"]
    assert len(reg) == 1, "operators are not tenants"


def test_disabled_operator_cannot_authenticate() -> None:
    reg = parse(f"[operators.ops]\n{paste_line(OP1)}\ndisabled = true\n")
    assert reg.authenticate_operator(OP1) is None
    assert reg.operators == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"[tenants.a]\n{paste_line(K1)}\n[operators.ops]\n{paste_line(K1)}\n", "also a key of tenant a"),
        (f"[operators.x]\n{paste_line(K1)}\n[operators.y]\n{paste_line(K1)}\n", "also used by operator x"),
        ("[operators.ops]\nkey_sha256 = []\n", "at least one key hash"),
        (f"[operators.ops]\n{paste_line(K1)}\ndaily_quota = 1\n", "unknown setting(s) daily_quota"),
        (f'[operators."a b"]\n{paste_line(K1)}\n', "operator name"),
        ("operators = 1\n", "[operators] must be a table"),
    ],
)
def test_bad_operator_tables_are_refused(text: str, message: str) -> None:
    with pytest.raises(TenantsFileError) as err:
        parse(text)
    assert message in str(err.value)


def test_reload_is_audited_by_name_without_keys(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "tenants.toml"
    write(path, f"[tenants.a]\n{paste_line(K1)}\n[tenants.b]\n{paste_line(K2)}\n")
    store = TenantStore(path, TenantRegistry.load(path))
    write(
        path,
        f"[tenants.a]\n{paste_line(K3)}\ndaily_quota = 7\n[tenants.c]\n{paste_line(K2)}\n"
        f"[operators.ops]\n{paste_line(OP1)}\n",
    )
    with caplog.at_level(logging.INFO, logger="facegate.audit"):
        assert store.reload() is True
    (record,) = [r for r in caplog.records if r.name == "facegate.audit"]
    assert record.action == "tenants.reload"  # type: ignore[attr-defined]
    assert record.actor == "system"  # type: ignore[attr-defined]
    details = record.details  # type: ignore[attr-defined]
    assert details["tenants_added"] == ["c"]
    assert details["tenants_removed"] == ["b"]
    assert details["tenants_changed"] == {"a": ["limits.daily_quota"]}
    assert details["operators_added"] == ["ops"]
    assert details["keys_changed"] == ["a"], "a's key was rotated (same count, another hash)"
    text = repr(record.__dict__)
    for secret in (K1, K2, K3, OP1, hash_key(K1), hash_key(K2), hash_key(K3), hash_key(OP1)):
        assert secret not in text
