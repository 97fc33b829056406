"""Benchmarks: ``python -m bench.run`` (``make bench``) measures facegate against baselines.

Everything runs on loopback and is started by the harness itself; see ``bench/README.md``.
"""
