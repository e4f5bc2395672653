"""Studies: code that produces the project's evidence (Theorem 5.1, Match3, the scaling study).

Kept apart from the library: the library computes 2-simplicial attention and trains models; a study
uses it and writes its results (JSON and PNG) under ``results/``.
"""
