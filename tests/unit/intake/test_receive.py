"""Property tests of the upload intake (``app.intake.receive``) on arbitrary bodies.

The image sniffer and the normalizer have their own property tests; this covers the
layer in front of them: whatever bytes arrive, cut into whatever chunks, with whatever
Content-Type, ``receive`` either returns an upload or raises a :class:`Problem` with a
documented code — never another exception — and a well-formed form yields exactly the
image's bytes however the stream was split.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.errors import Problem
from app.intake.receive import MAX_PARTS, IntakeLimits, Upload, receive
from tests.imagegen import encode, pixels

REFUSALS = {
    "image_missing",
    "invalid_request",
    "image_too_large",
    "unsupported_media_type",
    "invalid_image",
    "image_dimensions",
}
JPEG = encode(pixels(64, 48, seed=7), "jpeg")
BOUNDARY = b"fuzz-boundary"
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def limits(tmp: Path) -> IntakeLimits:
    return IntakeLimits(max_bytes=256 * 1024, max_pixels=4095**2, spool_threshold=2048, spool_dir=tmp, body_timeout_s=5)


async def _stream(body: bytes, cuts: list[int]) -> AsyncIterator[bytes]:
    last = 0
    for cut in [*sorted({c % (len(body) + 1) for c in cuts}), len(body)]:
        if cut > last:
            yield body[last:cut]
            last = cut


def run(body: bytes, cuts: list[int], ctype: str | None, tmp: Path, declared: bool = True) -> Upload | Problem:
    async def go() -> Upload | Problem:
        try:
            upload = await receive(_stream(body, cuts), ctype, str(len(body)) if declared else None, limits(tmp))
        except Problem as problem:
            return problem
        try:
            await upload.inspect()  # what the use case does before anything goes upstream
        except Problem as problem:
            upload.close()
            return problem
        return upload

    return asyncio.run(go())


CTYPES = st.sampled_from(
    [
        "multipart/form-data; boundary=fuzz-boundary",
        'multipart/form-data; boundary="fuzz-boundary"',
        "multipart/form-data",
        "multipart/form-data; boundary=",
        "image/jpeg",
        "application/octet-stream",
        "text/plain",
        "",
    ]
)


@SETTINGS
@given(
    body=st.binary(max_size=4096), cuts=st.lists(st.integers(0, 4096), max_size=8), ctype=CTYPES, declared=st.booleans()
)
def test_arbitrary_bodies_end_in_an_upload_or_a_documented_problem(
    tmp_path: Path, body: bytes, cuts: list[int], ctype: str, declared: bool
) -> None:
    result = run(body, cuts, ctype, tmp_path, declared)
    if isinstance(result, Problem):
        assert result.code in REFUSALS, result
    else:
        result.close()


_header_bytes = st.binary(max_size=60).filter(lambda b: b"\r\n" not in b)
_field = st.tuples(
    st.sampled_from([b"note", b"image", b"file", b"x"]),
    st.binary(max_size=300),
    st.lists(_header_bytes, max_size=3),
)


def part(name: bytes, data: bytes, extra: list[bytes], filename: bool = True) -> bytes:
    disposition = b'Content-Disposition: form-data; name="' + name + b'"' + (b'; filename="a.jpg"' if filename else b"")
    headers = [disposition, *(b"X-" + h.replace(b":", b"") + b": v" for h in extra)]
    return b"--" + BOUNDARY + b"\r\n" + b"\r\n".join(headers) + b"\r\n\r\n" + data + b"\r\n"


@SETTINGS
@given(
    fields=st.lists(_field, max_size=6),
    cuts=st.lists(st.integers(0, 20_000), max_size=12),
    mangle=st.one_of(st.none(), st.tuples(st.integers(0, 20_000), st.binary(min_size=1, max_size=8))),
)
def test_mutated_forms_never_escape_as_other_exceptions(
    tmp_path: Path, fields: list[tuple[bytes, bytes, list[bytes]]], cuts: list[int], mangle: tuple[int, bytes] | None
) -> None:
    body = b"".join(part(name, data, extra) for name, data, extra in fields) + b"--" + BOUNDARY + b"--\r\n"
    if mangle is not None:
        at = mangle[0] % (len(body) + 1)
        body = body[:at] + mangle[1] + body[at + len(mangle[1]) :]
    result = run(body, cuts, "multipart/form-data; boundary=" + BOUNDARY.decode(), tmp_path)
    if isinstance(result, Problem):
        assert result.code in REFUSALS, result
    else:
        result.close()


@SETTINGS
@given(
    before=st.lists(st.tuples(st.sampled_from([b"note", b"lang"]), st.binary(max_size=200)), max_size=4),
    after=st.lists(st.tuples(st.sampled_from([b"note", b"lang"]), st.binary(max_size=200)), max_size=4),
    cuts=st.lists(st.integers(0, 20_000), max_size=12),
    # RFC 2046 allows preamble text, but python-multipart refuses it (400 invalid_request);
    # no HTTP client sends one, so only the blank-line preamble is required to work.
    preamble=st.sampled_from([b"", b"\r\n"]),
)
def test_well_formed_form_yields_exactly_the_image_however_it_is_split(
    tmp_path: Path,
    before: list[tuple[bytes, bytes]],
    after: list[tuple[bytes, bytes]],
    cuts: list[int],
    preamble: bytes,
) -> None:
    fields = [part(n, d.replace(BOUNDARY, b""), [], filename=False) for n, d in before]
    fields.append(part(b"image", JPEG, []))
    fields += [part(n, d.replace(BOUNDARY, b""), [], filename=False) for n, d in after]
    body = preamble + b"".join(fields) + b"--" + BOUNDARY + b"--\r\n"
    result = run(body, cuts, "multipart/form-data; boundary=" + BOUNDARY.decode(), tmp_path)
    if len(fields) > MAX_PARTS:
        assert isinstance(result, Problem)
        return
    assert isinstance(result, Upload), result
    try:
        assert result.sha256 == hashlib.sha256(JPEG).hexdigest()
        assert result.size == len(JPEG)
        assert result.facts is not None
        assert (result.facts.width, result.facts.height) == (64, 48)
        content = result.body.content()  # the chunks kept (or spooled) as they came, joined
        assert (content if isinstance(content, bytes) else content.read()) == JPEG
    finally:
        result.close()
    assert list(tmp_path.iterdir()) == [], "spool files are anonymous and gone once closed"
