"""The offline commands: shard, merge, reshard, lora-merge, verify, synth and stage. Torch-free,
so the sharding Job's image and its tests need no accelerator stack.
"""
