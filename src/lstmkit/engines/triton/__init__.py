"""The GPU engine: Triton kernels (kernels/triton) bound to torch."""
