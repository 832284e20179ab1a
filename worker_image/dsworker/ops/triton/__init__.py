"""Triton kernels behind the CUDA implementations of `dsworker.ops`; import only where triton exists."""
