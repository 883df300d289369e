"""memzoo's benchmarks: `python -m benchmarks [names...]` (see harness.py).

Kept free of imports so that `_peer_recurrentgemma.py`, which runs in the peers' virtual
environment where memzoo is not installed, can import `benchmarks._timing`.
"""
