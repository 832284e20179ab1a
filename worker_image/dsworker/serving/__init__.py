"""Rank 0's OpenAI-compatible HTTP API: the app factory, thin routers per endpoint family, the
protocol schemas and logprobs objects. Torch-free: it talks to the engine through request types.
"""
