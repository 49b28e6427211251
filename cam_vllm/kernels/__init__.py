"""Device kernels (Triton) for the CUDA path; each has a torch twin it is tested against.

Nothing here is imported unless Triton is installed and the CUDA worker (or a test) asks for it.
"""
