"""dsworker: the data plane of the DeepSeek MoE operator (sharder, stager, engine, server)."""

__version__ = "0.1.0"
