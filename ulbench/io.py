"""Small file helpers: atomic writes so that a killed process never leaves a half-written result."""
from __future__ import annotations

import json
import os

from ul_model.io import atomic_write

__all__ = ["atomic_write", "write_json"]


def write_json(path: str | os.PathLike, obj: object) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
