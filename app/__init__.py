"""facegate: a self-hosted gateway in front of ailabapi's Face Analyzer Advanced API.

The path of one analyze request, and the module for each step::

    api/edge.py         request id, common headers, one access-log line, last-resort 500
    api/v1.py, compat.py  the routes (thin): parse HTTP, call the use case, render
    api/deps.py         runtime, context, tenant (authentication), cache directives
    intake/             1. receive the upload: stream, cap, hash (receive, spool); judge it (sniff)
    service.py          the use case, in this order — free answers before anything that costs:
      cache.py            2. the cache, addressed by the image's SHA-256 (entry.py: what is stored)
      singleflight.py     3. join an identical call already in flight, here or on another replica
      limits/             4. rate limit + quota reservation, one atomic step (GCRA, windows, Lua)
      upstream/           5. the paid call: resilience.py (breaker, retries, key failover) →
                             pool/ (a slot on one key, granted fairly across tenants and replicas;
                             key health and balances) → ailabapi.py (one attempt); keys.py: the
                             keys file; contract.py: what ailabapi is
    schema/             6. both upstream answer shapes → the v1 JSON schema
    api/responses.py    the answer, or a problem (problem+json, or ailabapi's envelope)

Around it: ``main.py`` (the app factory), ``runtime.py`` (backends chosen and built once, the
lifespan), ``settings.py``, ``tenants.py``, ``redisconn.py`` (the Redis pool and its health),
``observability.py`` (metrics, logs), ``purge.py`` (deletion in Redis, every replica's local tier
and calls in flight), ``audit.py`` (the ``facegate.audit`` trail), ``cli.py`` (``facegate …``),
``client.py`` (the Python client), ``sim/`` (the ailabapi simulator for sandbox mode, tests and benchmarks). The import
direction is enforced by import-linter (``[tool.importlinter]`` in pyproject.toml).
"""

__version__ = "0.1.0"
