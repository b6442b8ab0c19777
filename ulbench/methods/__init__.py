"""Methods the harness trains and evaluates, behind one small interface (``base.MethodKind``).

The harness knows methods only by kind name; each kind module adapts one model family (UL now, baselines later).
"""
from __future__ import annotations

from ulbench.methods import ldm
from ulbench.methods.base import MethodKind, StepInputs
from ulbench.methods.ul import UL

KINDS: dict[str, MethodKind] = {k.name: k for k in (UL(), *ldm.kinds())}


def get_kind(name: str) -> MethodKind:
    if name not in KINDS:
        raise KeyError(f"unknown method kind '{name}'; available: {', '.join(KINDS)}")
    return KINDS[name]


def kind_of_preset(preset: str) -> MethodKind:
    """The kind that defines a preset name (preset names are unique across kinds)."""
    for kind in KINDS.values():
        if preset in kind.presets():
            return kind
    names = [p for k in KINDS.values() for p in k.presets()]
    raise KeyError(f"unknown preset '{preset}'; available: {', '.join(names)}")


__all__ = ["KINDS", "MethodKind", "StepInputs", "get_kind", "kind_of_preset"]
