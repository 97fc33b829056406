"""The runtime's start-up and shutdown (app/runtime.py)."""

from __future__ import annotations

import gc
from pathlib import Path

from app.main import create_app
from app.settings import Settings
from tests.conftest import write_tenants


async def test_what_start_up_built_is_frozen_out_of_the_collector_until_shutdown(tmp_path: Path) -> None:
    """A full collection must not walk the start-up heap mid-traffic (a 50-90 ms pause measured on
    a miss-path load); shutdown unfreezes it, so apps started one after another (tests) leave nothing
    frozen for good."""
    gc.unfreeze()
    write_tenants(tmp_path / "tenants.toml", {"alpha": {}})
    app = create_app(Settings(_env_file=None, tenants_file=tmp_path / "tenants.toml"))
    async with app.router.lifespan_context(app):
        frozen = gc.get_freeze_count()
        assert frozen > 10_000, frozen  # modules, settings, routes, clients: all of start-up
        assert gc.collect() >= 0 and gc.get_freeze_count() == frozen  # a collection leaves them be
    assert gc.get_freeze_count() == 0
