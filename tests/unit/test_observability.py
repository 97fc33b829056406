"""Log formatting: JSON for machines, a short line for people at a terminal, never a traceback."""

from __future__ import annotations

import io
import json
import logging

import pytest

from app.observability import configure_logging


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _emit(stream: io.StringIO, fmt: str) -> str:
    configure_logging("info", fmt, stream)
    log = logging.getLogger("facegate.test")
    log.info("hello", extra={"request_id": "r1", "tenant": "alpha"})
    try:
        raise ValueError("secret-in-message")
    except ValueError:
        log.exception("failed")
    return stream.getvalue()


def test_json_when_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    lines = [json.loads(line) for line in _emit(io.StringIO(), "auto").splitlines()]
    assert lines[0]["msg"] == "hello" and lines[0]["request_id"] == "r1" and lines[0]["tenant"] == "alpha"
    assert lines[1]["error"] == "ValueError"
    assert "secret-in-message" not in json.dumps(lines) and "Traceback" not in json.dumps(lines)


def test_text_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    out = _emit(Tty(), "auto")
    first, second = out.splitlines()
    assert "INFO" in first and "hello" in first and "request_id=r1" in first
    assert not first.startswith("{")
    assert "error=ValueError" in second and "Traceback" not in out and "secret-in-message" not in out
