"""Which layers a compression method touches: every module of some kinds, minus the ones `skip` names.

Quantization, QAT, pruning and clustering all take `skip` the same way: a module name keeps that module and
everything inside it (`"classifier"`, `"bert.layers.5"`), so "leave the head in floating point" is one word.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def named_by(name: str, patterns: Iterable[str]) -> bool:
    """Whether module `name` is one of `patterns` or lies inside one of them (a dotted prefix)."""
    return any(name == p or name.startswith(p + ".") for p in patterns)


def select_layers(model: nn.Module, kinds: tuple[type[nn.Module], ...], skip: str | Iterable[str] = (),
                  action: str = "compress") -> list[tuple[str, nn.Module]]:
    """(name, module) of every module of `kinds` outside `skip`, in model order.

    A skip name that matches no module is refused (a typo would otherwise compress what it meant to keep), and
    so is a selection that comes out empty; both errors name the model and `action` ("quantize", "prune" ...).
    """
    skip = [skip] if isinstance(skip, str) else list(skip)
    names = [name for name, _ in model.named_modules()]
    if unused := [p for p in skip if not any(named_by(name, [p]) for name in names)]:
        raise ValueError(f"skip names {unused} match no module of {type(model).__name__}")
    found = [(name, m) for name, m in model.named_modules() if name and isinstance(m, kinds)
             and not named_by(name, skip)]
    if not found:
        kind_names = " or ".join(f"nn.{k.__name__}" if k.__module__.startswith("torch") else k.__name__
                                 for k in kinds)
        raise ValueError(f"{type(model).__name__} has no {kind_names} layer left to {action} (skip={skip})")
    return found
