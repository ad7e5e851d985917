"""Triton kernels of power retention (degree 2, head sizes 16..128 in steps of 16) and the host
functions that chain them; ``supported`` says when they apply (else the PyTorch path runs)."""

from .host import backward, decode_into, fold, forward, low_width, supported

__all__ = ["backward", "decode_into", "fold", "forward", "low_width", "supported"]
