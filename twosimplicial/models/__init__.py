"""Language models built from dot-product and 2-simplicial attention layers."""
from .config import PRESETS, ModelConfig
from .flops import flops_per_token, n_triples
from .transformer import TwoSimplicialLM, count_parameters

__all__ = ["ModelConfig", "PRESETS", "TwoSimplicialLM", "count_parameters", "flops_per_token", "n_triples"]
