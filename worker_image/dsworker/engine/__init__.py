"""The serving engine around the model: request types (torch-free), scheduler, KV pages, the
step wire and control channel, the per-rank runner, the loader, sampling, grammar masks and the loop.
"""
