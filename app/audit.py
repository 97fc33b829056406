"""The audit trail: one JSON line per deletion, purge, admin read and configuration reload.

Everything that removes data or reads another tenant's data, and every change of who may
do what (the tenants file, the upstream keys file), calls :func:`audit`, which writes one
record on the logger ``facegate.audit`` (a JSON line like every log line; route it apart
with a log shipper filter on ``logger``). A record names the action, the actor (``operator:
NAME``, ``tenant:NAME``, ``cli:USER`` or ``system``), the request id when there is one, and
the action's details by name — never a key and never a hash of a key: values that look like
a facegate key are replaced by ``[redacted]`` as a last line of defence.

Usage::

    from app.audit import audit
    audit("cache.purge_tenant", actor="operator:ops", request_id=ctx.request_id, tenant="checkout", deleted=12)
"""

from __future__ import annotations

import logging
from typing import Any, Final

log = logging.getLogger("facegate.audit")

#: Prefixes of facegate's own keys (tenant ``fg_``, operator ``fgop_``; see app.tenants).
_KEY_PREFIXES: Final = ("fg_", "fgop_")
REDACTED: Final = "[redacted]"


def audit(action: str, *, actor: str, request_id: str | None = None, **details: Any) -> None:
    """Write one audit record: ``action`` (dotted, e.g. ``cache.delete``), who, and what.

    ``details`` must be JSON-serialisable facts named by what they are (tenant names, an
    image hash, counts, lists of changed settings). Never pass a key or a key's hash.
    """
    log.info(
        action,
        extra={"audit": True, "action": action, "actor": actor, "request_id": request_id, "details": _clean(details)},
    )


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return REDACTED if value.startswith(_KEY_PREFIXES) else value
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean(v) for v in value]
    return value
