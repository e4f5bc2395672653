"""Layers built on the ops."""
from .two_simplicial import TwoSimplicialAttention

__all__ = ["TwoSimplicialAttention"]
