"""Process launch: `dsworker serve` resolves the config and starts the pod's ranks, the per-rank
entry loads and serves, and `dsworker generate` is the engine's smoke test.
"""
