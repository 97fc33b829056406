"""The audit line: one JSON record on ``facegate.audit``, named facts, never a key."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from app.audit import REDACTED, audit
from app.observability import configure_logging
from app.tenants import OPERATOR_KEY_PREFIX, new_key


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    out = io.StringIO()
    configure_logging("info", "json", out)
    yield out
    root.handlers[:] = handlers
    root.setLevel(level)


def test_one_json_line_with_action_actor_request_id_and_details(stream: io.StringIO) -> None:
    audit("cache.purge_tenant", actor="operator:ops", request_id="r-1", tenant="alpha", deleted=3)
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["logger"] == "facegate.audit"
    assert record["msg"] == record["action"] == "cache.purge_tenant"
    assert record["actor"] == "operator:ops"
    assert record["request_id"] == "r-1"
    assert record["details"] == {"tenant": "alpha", "deleted": 3}
    assert record["audit"] is True


def test_details_named_like_log_record_fields_do_not_clash(stream: io.StringIO) -> None:
    audit("x", actor="system", name="alpha", msg="m", args=[1])  # reserved LogRecord names, nested: fine
    assert json.loads(stream.getvalue())["details"] == {"name": "alpha", "msg": "m", "args": [1]}


def test_anything_that_looks_like_a_key_is_redacted(stream: io.StringIO) -> None:
    tenant_key, operator_key = new_key(), new_key(OPERATOR_KEY_PREFIX)
    audit("x", actor="system", key=tenant_key, nested={"k": [operator_key]})
    text = stream.getvalue()
    assert tenant_key not in text
    assert operator_key not in text
    assert json.loads(text)["details"] == {"key": REDACTED, "nested": {"k": [REDACTED]}}
