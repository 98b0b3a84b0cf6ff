"""The CPU engine: Numba kernels bound to torch (engine.py, variants.py) and as torch.library ops (compile_ops.py)."""
