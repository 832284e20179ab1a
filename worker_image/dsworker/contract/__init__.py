"""The worker's contract with the operator: the parallel plan, rank layout and split rules,
engine-config keys, KV budget arithmetic and exit codes. Pure (no torch): the only part of
dsworker the operator may import.
"""
