"""Offline data: a code corpus from installed Python sources, arithmetic word problems,
Match3, and a deterministic, resumable mixture loader."""
from .code import CodeCorpus, CodeCorpusConfig, build_code_corpus, default_cache_dir
from .datasets import Data, DataConfig, make_data, prepare_corpus
from .loader import MixtureLoader, TokenChunks
from .match3 import Match3Source, balanced_modulus, match3_batch, match3_labels, position_baseline
from .math import Problem, evaluate_ops, math_problems
from .tokenizer import EOS, load_tokenizer, train_bpe

__all__ = [
    "CodeCorpus", "CodeCorpusConfig", "build_code_corpus", "default_cache_dir",
    "Data", "DataConfig", "make_data", "prepare_corpus",
    "MixtureLoader", "TokenChunks",
    "Match3Source", "balanced_modulus", "match3_batch", "match3_labels", "position_baseline",
    "Problem", "evaluate_ops", "math_problems",
    "EOS", "load_tokenizer", "train_bpe",
]
