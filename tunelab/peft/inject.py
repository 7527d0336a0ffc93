"""Finding the layers a PEFT method adapts, swapping them in place, and per-adapter copies of new heads.

Every method in tunelab.peft does the same three things to a pretrained model: pick modules by name
(`find_targets`), replace each with a wrapper that holds the original (`replace_module`), and keep a
trainable copy of any module that must be learned in full, such as a new classification head
(`ModulesToSave`). Targets are named the way peft names them: a list of name suffixes
(["q_proj", "v_proj"] matches "bert.layers.3.attn.q_proj"), one regular expression that must match
the whole module name, or "all-linear": every linear layer but the model's output layers (the classifier, the LM
head), which its family description names.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence

from torch import Tensor, nn

from tunelab.core.family import family_of

ALL_LINEAR = "all-linear"  # peft's shorthand: every linear layer except the output layers


def matches(name: str, targets: str | Sequence[str]) -> bool:
    """Whether module `name` is targeted: a regex matching the whole name, or a suffix at a dot boundary."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, targets: str | Sequence[str], kinds: tuple[type, ...] = (nn.Linear,),
                 method: str = "this method") -> list[str]:
    """Names of the modules of `kinds` that `targets` selects, in model order.

    Raises a ValueError when nothing matches, or when a suffix in a list matches no module at all (a typo
    would otherwise silently adapt fewer layers), listing the module names that do exist.
    """
    if targets == ALL_LINEAR or not isinstance(targets, str) and list(targets) == [ALL_LINEAR]:
        return _all_linear(model, kinds, method)
    if isinstance(targets, str):
        if not targets:
            raise ValueError("targets is an empty regular expression")
        re.compile(targets)
    elif not targets or any(not isinstance(t, str) or not t for t in targets):
        raise ValueError(f"targets must be a regex or a non-empty list of module-name suffixes, got {targets!r}")
    names = [n for n, m in model.named_modules() if isinstance(m, kinds)]
    found = [n for n in names if matches(n, targets)]
    unmatched = [] if isinstance(targets, str) else [t for t in targets if not any(matches(n, [t]) for n in names)]
    if not found or unmatched:
        kind_names = "/".join(k.__name__ for k in kinds)
        what = repr(targets) if not unmatched else ", ".join(repr(t) for t in unmatched)
        raise ValueError(f"target {what} matched no {kind_names} module that {method} can adapt; the "
                         f"{kind_names} modules of this model are: {_short_list(_layer_patterns(names))}")
    return found


def _all_linear(model: nn.Module, kinds: tuple[type, ...], method: str) -> list[str]:
    """Every module of `kinds` outside the family's output layers (and outside what they contain)."""
    family = family_of(model)
    if family is None:
        raise ValueError(f"targets={ALL_LINEAR!r} needs to know which layers are {type(model).__name__}'s outputs, and "
                         "it has no model family description: name the layers to adapt instead")
    outputs = tuple(family.outputs)
    found = [n for n, m in model.named_modules() if isinstance(m, kinds)
             and not any(n == o or n.startswith(o + ".") for o in outputs)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no linear layer besides its outputs {outputs} for {method}")
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` where module `name` is (a dotted path); return the module it replaces."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


class ModulesToSave(nn.Module):
    """A module trained in full next to an adapter (a new classification head): one trainable copy per
    adapter, the original kept frozen. The forward pass uses the active adapter's copy, or the original
    when that adapter has none. (peft's `modules_to_save` does the same.)"""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active: str | None = None
        for p in original.parameters():
            p.requires_grad_(False)

    def add(self, adapter_name: str) -> None:
        if adapter_name in self.copies:
            raise ValueError(f"adapter {adapter_name!r} already has a copy of this module")
        self.copies[adapter_name] = trained = copy.deepcopy(self.original)
        for p in trained.parameters():
            p.requires_grad_(True)
        self.active = adapter_name

    def forward(self, *args, **kwargs):
        module = self.copies[self.active] if self.active in self.copies else self.original
        return module(*args, **kwargs)


def add_modules_to_save(model: nn.Module, names: Sequence[str], adapter_name: str) -> list[str]:
    """Give each module named (by suffix) in `names` a trainable copy for `adapter_name`; return their paths."""
    if not names:
        return []
    wrapped = {n for n, m in model.named_modules() if isinstance(m, ModulesToSave)}
    inside = tuple(f"{n}." for n in wrapped)
    candidates = [n for n, _ in model.named_modules() if n and not n.startswith(inside)]
    found = [n for n in candidates if matches(n, list(names))]
    missing = [t for t in names if not any(matches(n, [t]) for n in found)]
    if missing:
        raise ValueError(f"modules_to_save {missing} matched no module; top-level modules are: "
                         f"{_short_list([n for n, _ in model.named_children()])}")
    for name in found:
        module = model.get_submodule(name)
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            replace_module(model, name, module)
        module.add(adapter_name)
    return found


def set_active(model: nn.Module, adapter_name: str) -> None:
    """Make `adapter_name`'s copies the ones used (and trained); the other adapters' copies are frozen."""
    for module in model.modules():
        if isinstance(module, ModulesToSave):
            module.active = adapter_name
            for name, trained in module.copies.items():
                for p in trained.parameters():
                    p.requires_grad_(name == adapter_name)


def saved_module_tensors(model: nn.Module, adapter_name: str) -> dict[str, Tensor]:
    """{module path.leaf: tensor} of every `ModulesToSave` copy of `adapter_name`, under the original's path."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave) and adapter_name in module.copies:
            for leaf, tensor in module.copies[adapter_name].state_dict().items():
                out[f"{name}.{leaf}"] = tensor
    return out


def _layer_patterns(names: list[str]) -> list[str]:
    """Collapse layer indices ("layers.0.attn.q_proj", "layers.1.attn.q_proj" -> "layers.N.attn.q_proj")."""
    return list(dict.fromkeys(re.sub(r"\.\d+\.", ".N.", n) for n in names))


def _short_list(names: list[str], limit: int = 30) -> str:
    more = f" ... (+{len(names) - limit})" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
