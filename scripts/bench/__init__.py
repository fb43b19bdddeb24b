"""Benchmarks of pipeline-balancer against the seed's HAProxy set-up (see docs/benchmarks.md).

Each module is one command: ``python3 -m scripts.bench.<name> [--smoke|--quick] [--out DIR]``;
``scripts/bench/run_all.sh`` runs them all.
"""
