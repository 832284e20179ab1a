"""deepseek_operator: the control plane (API models, CRD generation, planning, kopf handlers)."""

__version__ = "0.1.0"
