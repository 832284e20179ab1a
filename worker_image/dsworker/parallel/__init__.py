"""Devices and process groups: the one place that knows npu/cuda/cpu and builds a model
instance's groups from the plan.
"""
