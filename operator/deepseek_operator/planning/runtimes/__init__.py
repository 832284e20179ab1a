"""Pure renderers of each runtime's own configuration from one validated spec.

`dsworker` renders the project's engine.json and `dsworker serve`, `mindie` MindIE Service's
config.json, environment and start command, `vllm` the `vllm serve` arguments. Each returns an
EngineRendering (the ConfigMap's files and the serving container's command, args, env, ports and
probes); the StatefulSet builder adds what every runtime shares (volumes, resources, security).
"""

from .common import EngineRendering, Placement

__all__ = ["EngineRendering", "Placement"]
