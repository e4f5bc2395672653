"""The Triton backend (docs/kernels.md): ``fwd`` and ``bwd`` hold the forward and backward
kernels with their host code, ``common`` what they share (the names both use, the scale
convention, row packing, the interpreter mechanism, stride packing), ``op`` the torch custom
ops over them. Imported only where the ``triton`` package is installed (``ops/interface.py``);
inside this package ``import triton`` is the real package (absolute imports)."""
