"""Checkpoint files without torch: safetensors reading and writing, tensor regions, the HF
checkpoint and sharded metadata, number formats, and the writer processes the tools share.
"""
