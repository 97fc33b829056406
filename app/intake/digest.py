"""The image's SHA-256 as the client declares it in a header, so a cache hit needs no body.

Two headers, one syntax (an RFC 8941 dictionary of byte sequences, as RFC 9530 defines
``Content-Digest``)::

    Content-Digest: sha-256=:<base64 of the 32-byte digest>:   # a raw image/* body: the body IS the image
    Image-Digest:   sha-256=:<base64 of the 32-byte digest>:   # multipart (or raw): the image part's bytes

On a multipart body, ``Content-Digest`` is the digest of the whole form, which says
nothing about the image: facegate does not use or check it there (RFC 9530 lets a
recipient ignore it). In ``Content-Digest``, members for other algorithms (``sha-512``, ...)
are ignored, as RFC 9530 asks of unsupported ones; ``Image-Digest`` must have ``sha-256``.
A header that is not a dictionary of byte sequences, or whose ``sha-256`` member is not 32
bytes, is refused with ``invalid_digest``: a client that meant to declare a digest made a
mistake it should hear about.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Final

from app.errors import Problem

CONTENT_DIGEST: Final = "content-digest"
IMAGE_DIGEST: Final = "image-digest"
ALGORITHM: Final = "sha-256"

_KEY = re.compile(r"[a-z*][a-z0-9_\-.*]*")
_TOKEN = re.compile(r"[A-Za-z*][!#$%&'*+\-.^_`|~:/0-9A-Za-z]*")
_NUMBER = re.compile(r"-?[0-9]{1,15}(?:\.[0-9]{1,3})?")
_BYTES = re.compile(r":([A-Za-z0-9+/=]*):")
_STRING = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*"')
_BOOLEAN = re.compile(r"\?[01]")
_OWS = re.compile(r"[ \t]*")
_SP = re.compile(r" *")


class _Malformed(ValueError):
    pass


def _bare_item(text: str, pos: int) -> tuple[object, int]:
    """One RFC 8941 bare item at ``pos``: bytes for a byte sequence, the matched text otherwise."""
    for pattern in (_BYTES, _STRING, _BOOLEAN, _NUMBER, _TOKEN):
        match = pattern.match(text, pos)
        if match:
            if pattern is _BYTES:
                try:
                    return base64.b64decode(match.group(1), validate=True), match.end()
                except (binascii.Error, ValueError):
                    raise _Malformed("not base64") from None
            return match.group(0), match.end()
    raise _Malformed("no item")


def _parameters(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] == ";":
        pos = _SP.match(text, pos + 1).end()  # type: ignore[union-attr]
        key = _KEY.match(text, pos)
        if not key:
            raise _Malformed("bad parameter")
        pos = key.end()
        if pos < len(text) and text[pos] == "=":
            _, pos = _bare_item(text, pos + 1)
    return pos


def parse_dictionary(text: str) -> dict[str, object]:
    """An RFC 8941 dictionary whose members are bare items (no inner lists: digest fields have none).

    Values are ``bytes`` for byte sequences and the raw text for other items; a later
    member with the same key wins, as RFC 8941 says. Raises ValueError when malformed.
    """
    out: dict[str, object] = {}
    pos = _SP.match(text, 0).end()  # type: ignore[union-attr]
    if pos == len(text):
        raise _Malformed("empty")
    while True:
        key = _KEY.match(text, pos)
        if not key:
            raise _Malformed("bad key")
        pos = key.end()
        value: object = True
        if pos < len(text) and text[pos] == "=":
            value, pos = _bare_item(text, pos + 1)
        pos = _parameters(text, pos)
        out[key.group(0)] = value
        pos = _OWS.match(text, pos).end()  # type: ignore[union-attr]
        if pos == len(text):
            return out
        if text[pos] != ",":
            raise _Malformed("expected a comma")
        pos = _OWS.match(text, pos + 1).end()  # type: ignore[union-attr]
        if pos == len(text):
            raise _Malformed("trailing comma")


def sha256_member(header: str, value: str) -> str | None:
    """The ``sha-256`` member of one digest header as 64 lowercase hex characters, or None
    when the header names only other algorithms. Malformed → Problem ``invalid_digest``.

    Every member must be a byte sequence (RFC 9530), so a bare hex digest — which parses as
    a dictionary key without a value — is refused rather than silently ignored.
    """
    try:
        members = parse_dictionary(value)
    except ValueError:
        members = {}
    if not members or not all(isinstance(v, bytes) for v in members.values()):
        raise Problem("invalid_digest", f"{header} must look like 'sha-256=:<base64 of the SHA-256>:'")
    digest = members.get(ALGORITHM)
    if digest is None:
        return None
    if not isinstance(digest, bytes) or len(digest) != 32:
        raise Problem("invalid_digest", f"{header}: sha-256 must be the 32-byte digest as ':<base64>:'")
    return digest.hex()


def declared_sha256(media: str, content_digest: str | None, image_digest: str | None) -> str | None:
    """The image's SHA-256 the request declares, or None when it declares none.

    ``media`` is the request's lowercased media type. ``Content-Digest`` counts only
    for a raw body (``multipart`` False); if both headers name a SHA-256, they must agree.
    """
    multipart = media == "multipart/form-data"
    found: dict[str, str] = {}
    if image_digest is not None:
        sha = sha256_member("Image-Digest", image_digest)
        if sha is None:  # facegate's own header: it has one algorithm, and a value without it is a mistake
            raise Problem("invalid_digest", "Image-Digest must name the image's sha-256: 'sha-256=:<base64>:'")
        found["Image-Digest"] = sha
    if content_digest is not None and not multipart:
        sha = sha256_member("Content-Digest", content_digest)
        if sha is not None:
            found["Content-Digest"] = sha
    if len(set(found.values())) > 1:
        raise Problem("digest_mismatch", "Content-Digest and Image-Digest name different images")
    return next(iter(found.values()), None)
