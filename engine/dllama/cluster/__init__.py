"""Tensor parallelism across nodes: the slice plan, the control plane and the worker."""
