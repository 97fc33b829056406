"""Loaded into a benchmarked gateway through ``PYTHONPATH`` (bench only, never the product).

With ``BENCH_GC_OUT`` set it records every garbage collection — when it ended (CLOCK_MONOTONIC,
the same clock in every process here), its generation and how long it stopped the process —
and appends them to that file (a JSON line each) every half second. With ``BENCH_GC_UNFREEZE=1`` it also undoes the
gateway's ``gc.freeze()`` as soon as start-up has made it (the "before" of row 2's GC line).
"""

from __future__ import annotations

import gc
import json
import os
import threading
import time
from typing import Any

OUT = os.environ.get("BENCH_GC_OUT")


def _install(out: str) -> None:
    events: list[tuple[float, int, float]] = []
    started: list[float] = [0.0]

    def callback(phase: str, info: dict[str, Any]) -> None:
        now = time.monotonic()
        if phase == "start":
            started[0] = now
        else:
            events.append((now, int(info["generation"]), now - started[0]))

    def writer() -> None:
        # Appends only what is new (a line per collection): rewriting the whole list every half
        # second cost the measured process several percent of its CPU.
        if os.environ.get("BENCH_GC_UNFREEZE") == "1":
            deadline = time.monotonic() + 60
            while gc.get_freeze_count() == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            gc.unfreeze()
        written = 0
        while True:
            time.sleep(0.5)
            new = events[written:]
            if new:
                with open(out, "a") as f:
                    f.writelines(json.dumps(e) + "\n" for e in new)
                written += len(new)

    gc.callbacks.append(callback)
    threading.Thread(target=writer, name="bench-gc-probe", daemon=True).start()


if OUT:
    _install(OUT)
