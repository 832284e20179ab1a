"""Pure planning: from a validated DeepSeekDeployment to the desired child objects (no I/O)."""
