"""Fused kernels: Triton implementations beside plain-torch references, dispatched by one registry.

``ops_for(cfg.kernels, device)`` (see :mod:`megaocto.kernels.registry`) gives the ops a model calls. Importing this
package (or the registry) never imports triton; the Triton kernel modules are imported on the first ``ops_for``
that resolves to ``triton``. Per-kernel contracts: the docstring of each module; overview: docs/kernels.md.
"""
from megaocto.kernels.registry import IMPLS, OPS, KernelOps, get, ops_for, register, resolve

__all__ = ["IMPLS", "OPS", "KernelOps", "get", "ops_for", "register", "resolve"]
