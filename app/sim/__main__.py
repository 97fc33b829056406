"""``python -m app.sim``: run the ailabapi simulator (same flags as ``facegate sim``)."""

from app.sim.serving import main

main()
