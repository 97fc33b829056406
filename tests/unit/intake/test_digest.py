"""The digest headers (``app.intake.digest``) and the per-tenant upload slots (``UploadGate``).

The dictionary parser is checked against ``http_sfv``, an independent RFC 8941
implementation: on any input both accept or both refuse, and they agree on the
``sha-256`` member.
"""

from __future__ import annotations

import base64
import hashlib

import pytest
from http_sfv.dictionary import Dictionary as SfDictionary
from hypothesis import given, settings
from hypothesis import strategies as st

from app.errors import Problem
from app.intake.digest import declared_sha256, parse_dictionary, sha256_member
from app.intake.receive import UploadGate

SHA = hashlib.sha256(b"an image").digest()
B64 = base64.b64encode(SHA).decode()


def reference(text: str) -> dict[str, object] | None:
    """http_sfv's reading: key -> bytes for byte sequences, else a marker; None when it refuses."""
    parsed = SfDictionary()
    try:
        parsed.parse(text.encode("latin-1"))
    except (ValueError, UnicodeEncodeError):
        return None
    return {k: (v.value if isinstance(getattr(v, "value", None), bytes) else "other") for k, v in parsed.items()}


def ours(text: str) -> dict[str, object] | None:
    try:
        got = parse_dictionary(text)
    except ValueError:
        return None
    return {k: (v if isinstance(v, bytes) else "other") for k, v in got.items()}


FRAGMENTS = st.sampled_from(
    [
        "sha-256",
        "sha-512",
        "id-sha-256",
        "SHA-256",
        "a",
        "*x",
        "=",
        ":",
        f":{B64}:",
        ":AAAA:",
        ":AAA:",
        ":!!:",
        "::",
        ",",
        ", ",
        " ",
        ";",
        ";p=1",
        ";q",
        '"s"',
        '"a\\"b"',
        "?1",
        "?2",
        "12",
        "-3.5",
        "1.2345",
        "tok/en",
        "(",
        ")",
        "\t",
    ]
)


@settings(max_examples=1000, deadline=None)
@given(st.lists(FRAGMENTS, min_size=1, max_size=8).map("".join))
def test_the_parser_agrees_with_http_sfv(text: str) -> None:
    expected = reference(text)
    got = ours(text)
    if expected is None:
        assert got is None, f"accepted {text!r}, which RFC 8941 refuses"
    else:
        assert got == expected, text


def test_member_forms() -> None:
    assert sha256_member("Content-Digest", f"sha-256=:{B64}:") == SHA.hex()
    assert sha256_member("Content-Digest", f"sha-512=:{B64}:, sha-256=:{B64}:;x=1") == SHA.hex()
    assert sha256_member("Content-Digest", f"sha-512=:{B64}:") is None  # unsupported algorithms are ignored
    for bad in ("", "sha-256", "sha-256=1", SHA.hex(), f"sha-256=:{B64[:-4]}:", f"sha-256=:{B64}:, x=1"):
        with pytest.raises(Problem) as refused:
            sha256_member("Content-Digest", bad)
        assert refused.value.code == "invalid_digest", bad


def test_which_header_counts_for_which_body() -> None:
    value = f"sha-256=:{B64}:"
    other = "sha-256=:" + base64.b64encode(hashlib.sha256(b"other").digest()).decode() + ":"
    assert declared_sha256("image/jpeg", value, None) == SHA.hex()
    assert declared_sha256("image/jpeg", None, value) == SHA.hex()
    assert declared_sha256("multipart/form-data", value, None) is None  # the form's digest, not the image's
    assert declared_sha256("multipart/form-data", "not even parsed", value) == SHA.hex()
    assert declared_sha256("image/png", value, value) == SHA.hex()
    with pytest.raises(Problem) as refused:
        declared_sha256("image/png", value, other)
    assert refused.value.code == "digest_mismatch"
    with pytest.raises(Problem) as refused:
        declared_sha256("multipart/form-data", None, f"sha-512=:{B64}:")  # Image-Digest speaks sha-256
    assert refused.value.code == "invalid_digest"


# --- UploadGate: the process's slots and each tenant's share ---------------------------------


async def test_a_tenant_only_exhausts_its_own_share() -> None:
    seen: list[int] = []
    gate = UploadGate(4, on_change=seen.append)
    assert gate.per_tenant == 2  # half by default
    async with gate.slot("noisy"), gate.slot("noisy"):
        with pytest.raises(Problem) as refused:
            async with gate.slot("noisy"):
                pass
        assert refused.value.code == "too_many_uploads"
        assert refused.value.status == 429
        async with gate.slot("quiet"), gate.slot("other"):
            with pytest.raises(Problem) as full:
                async with gate.slot("third"):
                    pass
            assert full.value.code == "overloaded"
    assert gate.active == 0
    assert gate.by_tenant == {}
    assert max(seen) == 4


def test_share_bounds() -> None:
    assert UploadGate(1).per_tenant == 1
    assert UploadGate(64).per_tenant == 32
    assert UploadGate(64, 100).per_tenant == 64  # never more than the whole
    gate = UploadGate(3, 3)
    assert all(gate.try_acquire("solo") for _ in range(3))
    assert not gate.try_acquire("solo")
    gate.release("solo")
    assert gate.try_acquire("solo")
