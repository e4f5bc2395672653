"""Type checks for the plain-data config tables (``[train]``, ``[data]``): one message format for all.

A TOML value has a definite type, but ``--set`` falls back to a string when the text is not
TOML (``--set train.compile=False`` gives ``"False"``), so every field is checked against its
annotation before it is used: a config error names its key, never surfaces as a Python error
deep inside the run.
"""
from __future__ import annotations

import dataclasses
import math


def check_types(section: str, obj) -> None:
    """Raise ``TypeError`` naming ``section.field`` for each dataclass field of the wrong type.

    Annotations understood: ``int`` (not bool), ``float`` (an int is accepted; finite), ``bool``
    (TOML's lowercase ``true``/``false``), ``str``, ``dict``, ``list``."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        name = f"{section}.{f.name}"
        if kind == "bool":
            if not isinstance(v, bool):
                raise TypeError(f"{name} must be true or false (lowercase, as TOML writes them), got {v!r}")
        elif kind == "int":
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an integer, got {v!r}")
        elif kind == "float":
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name} must be a number, got {v!r}")
            if not math.isfinite(v):
                raise ValueError(f"{name} must be finite, got {v!r}")
        elif kind in ("str", "dict", "list"):
            if not isinstance(v, {"str": str, "dict": dict, "list": list}[kind]):
                raise TypeError(f"{name} must be a {'string' if kind == 'str' else 'table' if kind == 'dict' else 'list'}, "
                                f"got {v!r}")
        else:
            raise AssertionError(f"check_types: no rule for the annotation {kind!r} of {name}")
