"""twosimplicial: 2-simplicial attention (Roy et al. 2025) with Triton kernels, layers and models.

The PyTorch path needs only ``torch``; the Triton kernels are used for CUDA tensors when the
``triton`` package is installed (``pip install twosimplicial[gpu]``).
"""
__version__ = "0.1.0"

from .layers import TwoSimplicialAttention
from .models import ModelConfig, TwoSimplicialLM
from .ops import two_simplicial_attention

__all__ = ["two_simplicial_attention", "TwoSimplicialAttention", "ModelConfig", "TwoSimplicialLM", "__version__"]
