"""twosimplicial: 2-simplicial attention (Roy et al. 2025) with Triton kernels, layers and models."""
from .ops import two_simplicial_attention
from .layers import TwoSimplicialAttention

__all__ = ["two_simplicial_attention", "TwoSimplicialAttention"]
__version__ = "0.1.0"
