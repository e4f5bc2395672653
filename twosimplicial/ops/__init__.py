"""2-simplicial attention ops: the public entry point, the dense reference and the backends."""
from .interface import two_simplicial_attention
from .naive import naive_two_simplicial_attention

__all__ = ["two_simplicial_attention", "naive_two_simplicial_attention"]
