"""Generators of the files derived from the API models, each a `python -m` command with --check:
the CRD (crd), its API reference (docs) and kopf's peering CRDs (peering). Pure: no cluster I/O."""
