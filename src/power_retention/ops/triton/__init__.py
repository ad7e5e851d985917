"""Triton kernels of power retention (degree 2 at head sizes 16, 32, 64, 128; degree 4 at 16,
32) and the host functions that chain them; ``supported`` says when they apply (else the
PyTorch path runs)."""

from .host import backward, decode_into, fold, forward, low_width, supported

__all__ = ["backward", "decode_into", "fold", "forward", "low_width", "supported"]
