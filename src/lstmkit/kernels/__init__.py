"""The compiled kernels, one folder per backend; none imports torch.

numba/   CPU: numpy arrays in and out (also the torch-free runtime's kernels)
triton/  GPU: Triton kernels, launched by engines/triton
"""
