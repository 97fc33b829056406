"""A contract-faithful stand-in for ailabapi's face-analyzer-advanced endpoint.

Every real call costs a credit and nobody can make ailabapi fail on demand, so the
gateway's tests, benchmarks and sandbox mode talk to this instead, over real sockets.
It reads the same table of upstream facts as the gateway (``app.upstream.contract``, the
only part of ``app`` it imports), so a corrected fact changes both sides at once, and it
decodes images for real, so its size/format verdicts are the ones ailabapi would give.

The request's path through the package: ``factory`` (routes, tag, log filter) →
``endpoint`` (key and ``state`` limits → ``body`` → ``faults`` → ``picture`` checks and
directives → ``faces`` truth rendered in either shape → ``replies``); ``control`` serves
``/_sim/*``; ``serving`` runs it (own process, or inside the gateway for sandbox mode).

Directives, faults, limits and the control endpoints are documented in
``docs/simulator.md``.
"""

from app.sim.config import DEFAULT_PORT, DIRECTIVE_MARK, SHAPE_HEADER, SIM_HEADER, SimConfig
from app.sim.factory import create_app
from app.sim.faults import Fault, FaultPlan, Limits
from app.sim.serving import BackgroundSim, main, serve, start_background

__all__ = [
    "DEFAULT_PORT",
    "DIRECTIVE_MARK",
    "SHAPE_HEADER",
    "SIM_HEADER",
    "BackgroundSim",
    "Fault",
    "FaultPlan",
    "Limits",
    "SimConfig",
    "create_app",
    "main",
    "serve",
    "start_background",
]
