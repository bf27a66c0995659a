"""Triton kernels and launchers (installed as pykernels.triton_kernels).

Import submodules explicitly (e.g. ``from .divergence import divergence_forward``) so that
importing the package does not require Triton.
"""
