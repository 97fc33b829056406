"""The pool of upstream keys, shared fairly: which call gets which key's slot, and when.

- ``base``: what the pool decides and reports (:class:`Caller`, :class:`Grant`, :class:`Outcome`,
  :class:`Refused`, the operator view) and the :class:`Dispatcher` protocol;
- ``core`` + ``lua/``: the decisions (fair order, key choice, health), written once in Python
  over a Redis-like store and mirrored in Lua;
- ``front``: the per-process side (waiting calls, the leased heartbeat);
- ``memory``: the embedded backend (one process); ``redis``: the backend shared by replicas;
- ``credits``: reading each key's balance now and then.
"""

from app.upstream.pool.base import (
    KEY_STATES,
    Caller,
    Dispatcher,
    Grant,
    KeyState,
    KeyView,
    Outcome,
    PoolView,
    Refused,
)
from app.upstream.pool.front import Hooks, PoolSettings
from app.upstream.pool.memory import MemoryPool
from app.upstream.pool.redis import RedisPool

__all__ = [
    "KEY_STATES",
    "Caller",
    "Dispatcher",
    "Grant",
    "Hooks",
    "KeyState",
    "KeyView",
    "MemoryPool",
    "Outcome",
    "PoolSettings",
    "PoolView",
    "RedisPool",
    "Refused",
]
