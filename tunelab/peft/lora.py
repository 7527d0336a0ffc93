"""LoRA: a frozen linear layer plus a trainable low-rank update, and its variants rsLoRA and DoRA.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (https://arxiv.org/abs/2106.09685), eq. 3:

    h = W x + b + s * B A dropout(x)       W: (out, in) frozen;  A: (r, in), B: (out, r) trained;  s = alpha / r

B starts at zero, so a fresh adapter leaves the model unchanged; after training, W + s B A can be merged into
the layer (no extra cost at inference) and subtracted again. rsLoRA (Kalajdzievski 2023, 2312.03732) uses
s = alpha / sqrt(r) so that larger ranks keep learning. DoRA (Liu et al. 2024, 2402.09353) splits the adapted
weight into a direction and a trained magnitude per output row. Numbers equal Hugging Face peft's `LoraModel`,
and `save_adapter` / `load_adapter` use peft's files, so each library reads the other's adapters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tunelab.core.family import family_of
from tunelab.peft.inject import ModulesToSave, add_modules_to_save, find_targets, matches, replace_module, set_active
from tunelab.peft.saving import (fan_in_fan_out, from_hf_path, key_prefix, peft_key, read_adapter, to_hf_path,
                                  write_adapter)


@dataclass
class LoRAConfig:
    """Settings of one LoRA adapter (Hu et al. 2021, arXiv 2106.09685).

    Args:
        r: rank of the update B A.
        alpha: the update is scaled by s = alpha / r (alpha / sqrt(r) with `use_rslora`).
        dropout: dropout probability on the input of the low-rank path only.
        targets: module-name suffixes (("q_proj", "v_proj")), one regex matching whole module names, or
            "all-linear" (every linear layer except the output layers, as peft).
        use_rslora: rank-stabilised scaling s = alpha / sqrt(r) (Kalajdzievski 2023, arXiv 2312.03732, eq. 4).
        use_dora: weight-decomposed LoRA (Liu et al. 2024, arXiv 2402.09353, eq. 5):
            W' = m * (W + s B A) / ||W + s B A||_row, with m trained and the norm treated as a constant.
        modules_to_save: modules trained in full next to the adapter (the new classification head).
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: tuple[str, ...] = ("classifier",)

    def __post_init__(self):
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"r must be a positive int, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.targets, str):
            self.targets = tuple(self.targets)
        self.modules_to_save = tuple(self.modules_to_save or ())

    @classmethod
    def tiny(cls, **overrides) -> "LoRAConfig":
        """A small adapter for tests and quick runs."""
        return cls(**{"r": 4, "alpha": 8, **overrides})

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


class LoRAAdapter(nn.Module):
    """The low-rank update of one linear layer: y = base(x) + s * B(A(dropout(x)))."""

    def __init__(self, in_features: int, out_features: int, config: LoRAConfig):
        super().__init__()
        self.config = config
        self.scaling = config.scaling
        self.A = nn.Linear(in_features, config.r, bias=False)  # (r, in)
        self.B = nn.Linear(config.r, out_features, bias=False)  # (out, r)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        # A random, B = 0: B A = 0 at the start (Hu et al., section 4.1). A is drawn a second time, as peft
        # draws it, so that the same seed gives peft's adapter.
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.B.weight)

    def delta_weight(self) -> Tensor:
        return self.scaling * (self.B.weight @ self.A.weight)  # (out, in)

    def forward(self, x: Tensor, base: nn.Linear) -> Tensor:
        return base(x) + self.scaling * self.B(self.A(self.dropout(x)))  # (..., out)

    @torch.no_grad()
    def merge(self, base: nn.Linear) -> None:
        base.weight += self.delta_weight()

    @torch.no_grad()
    def unmerge(self, base: nn.Linear) -> None:
        base.weight -= self.delta_weight()


class DoRAAdapter(LoRAAdapter):
    """DoRA (Liu et al. 2024, eq. 5): y = m / ||W + s B A||_row * (W + s B A) x + b, m a trained vector (out,)
    that starts at the row norms, so a fresh adapter is again the identity. The norm is detached (section 4.3)."""

    def __init__(self, in_features: int, out_features: int, config: LoRAConfig, base: nn.Linear):
        super().__init__(in_features, out_features, config)
        _move_like(self, base.weight)
        self.magnitude = nn.Parameter(self.weight_norm(base.weight))  # (out,)
        self.merged_norm: Tensor | None = None  # the norm used by merge(), needed to undo it

    def weight_norm(self, weight: Tensor) -> Tensor:
        return (weight + self.delta_weight()).detach().norm(dim=1)  # (out,) one norm per output row

    def forward(self, x: Tensor, base: nn.Linear) -> Tensor:
        g = self.magnitude / self.weight_norm(base.weight)  # (out,)
        if self.training and isinstance(self.dropout, nn.Dropout):
            # As peft: the frozen path sees x, the adapted direction sees dropout(x).
            x_d = self.dropout(x)
            return base(x) + (g - 1) * F.linear(x_d, base.weight) + g * self.scaling * self.B(self.A(x_d))
        return g * (F.linear(x, base.weight) + self.scaling * self.B(self.A(x))) + _bias(base)  # (..., out)

    @torch.no_grad()
    def merge(self, base: nn.Linear) -> None:
        self.merged_norm = self.weight_norm(base.weight)
        g = self.magnitude / self.merged_norm
        base.weight.copy_(g[:, None] * (base.weight + self.delta_weight()))

    @torch.no_grad()
    def unmerge(self, base: nn.Linear) -> None:
        g = self.magnitude / self.merged_norm
        base.weight.copy_(base.weight / g[:, None] - self.delta_weight())
        self.merged_norm = None


def check_rank(r: int, base: nn.Linear) -> None:
    """Refuse a rank the layer cannot hold: B A of rank r needs r <= min(in, out)."""
    in_features, out_features = base.in_features, base.out_features
    if r > min(in_features, out_features):
        raise ValueError(f"r={r} exceeds min(in_features={in_features}, out_features={out_features}) "
                         f"= {min(in_features, out_features)}: the update B A would not be low-rank")


def _move_like(module: nn.Module, weight: Tensor) -> None:
    """Put `module` on `weight`'s device, and in its dtype when that is a float type (not a packed one)."""
    module.to(device=weight.device, dtype=weight.dtype if weight.is_floating_point() else None)


def _bias(base: nn.Linear) -> Tensor | float:
    return 0.0 if base.bias is None else base.bias


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` (`.base`) with named LoRA adapters; the `.active` one is added to its output,
    unless it is `.merged` into the base weight (then the forward pass is the plain linear layer)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.merged = False
        base.requires_grad_(False)

    def add_adapter(self, name: str, config: LoRAConfig) -> None:
        if name in self.adapters:
            raise ValueError(f"this layer already has a LoRA adapter named {name!r}")
        check_rank(config.r, self.base)
        in_features, out_features = self.base.in_features, self.base.out_features
        if config.use_dora:
            self.adapters[name] = DoRAAdapter(in_features, out_features, config, self.base)
        else:
            self.adapters[name] = LoRAAdapter(in_features, out_features, config)
        _move_like(self.adapters[name], self.base.weight)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or self.active not in self.adapters:
            return self.base(x)  # (..., out)
        return self.adapters[self.active](x, self.base)  # (..., out)

    def merge(self) -> None:
        if self.merged:
            raise ValueError("this LoRA layer is already merged; unmerge it first")
        if not isinstance(self.base, nn.Linear):
            raise ValueError(f"the base of this LoRA layer is a {type(self.base).__name__}, whose weight is stored in "
                             "codes and cannot absorb the update in place (QLoRA: merge with merge_qlora)")
        if self.active in self.adapters:
            self.adapters[self.active].merge(self.base)
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            raise ValueError("this LoRA layer is not merged")
        if self.active in self.adapters:
            self.adapters[self.active].unmerge(self.base)
        self.merged = False

    def extra_repr(self) -> str:
        return f"active={self.active!r}, merged={self.merged}"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """{module path: LoRALinear} of every LoRA layer in `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, config: LoRAConfig | None = None, adapter_name: str = "default",
               **overrides) -> nn.Module:
    """Add LoRA adapter `adapter_name` to the linear layers `config.targets` selects, in place, and make it
    the active one: everything is frozen except this adapter and its copies of `config.modules_to_save`.

    Keyword `overrides` replace config fields (`apply_lora(model, r=4, targets=["q_proj"])`).
    """
    known = {f.name for f in fields(LoRAConfig)}
    if unknown := sorted(set(overrides) - known):
        raise ValueError(f"unknown LoRAConfig fields {unknown}; the fields are {sorted(known)}")
    config = replace(config or LoRAConfig(), **overrides)
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string without dots, got {adapter_name!r}")
    layers = lora_layers(model)
    if any(adapter_name in layer.adapters for layer in layers.values()):
        raise ValueError(f"LoRA adapter {adapter_name!r} is already applied to this model; choose another name")
    if any(layer.merged for layer in layers.values()):
        raise ValueError("this model's LoRA layers are merged; call unmerge_lora before adding an adapter")
    # The linear layers inside LoRA layers and saved-module wrappers are not targets themselves.
    inside = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, (LoRALinear, ModulesToSave)))
    names = find_targets(model, config.targets, (nn.Linear, LoRALinear), "LoRA")
    names = [n for n in names if not n.startswith(inside)]
    if not names:
        raise ValueError(f"targets {config.targets!r} matched only layers inside LoRA layers or saved modules")
    module_names = [n for n, _ in model.named_modules() if n]
    if missing := [t for t in config.modules_to_save if not any(matches(n, [t]) for n in module_names)]:
        raise ValueError(f"modules_to_save {missing} matched no module of {type(model).__name__}; "
                         "pass modules_to_save=() when the model has no new head to train")
    for name in names:  # check every layer before changing any
        layer = model.get_submodule(name)
        try:
            check_rank(config.r, layer.base if isinstance(layer, LoRALinear) else layer)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, LoRALinear):
            layer = LoRALinear(layer)
            replace_module(model, name, layer)
        layer.add_adapter(adapter_name, config)
    add_modules_to_save(model, config.modules_to_save, adapter_name)
    set_adapter(model, adapter_name)
    return model


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Use and train adapter `adapter_name` (LoRA and saved modules); freeze every other parameter."""
    layers = lora_layers(model)
    if not any(adapter_name in layer.adapters for layer in layers.values()):
        names = sorted({n for layer in layers.values() for n in layer.adapters})
        raise ValueError(f"no LoRA adapter named {adapter_name!r}; this model has {names}")
    if any(layer.merged for layer in layers.values()):
        raise ValueError("this model's LoRA layers are merged; call unmerge_lora before switching adapters")
    model.requires_grad_(False)
    for layer in layers.values():
        layer.active = adapter_name
        if adapter_name in layer.adapters:
            layer.adapters[adapter_name].requires_grad_(True)
    set_active(model, adapter_name)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the active adapter into each base weight: W <- W + s B A (DoRA: m / ||W + s B A|| * (W + s B A))."""
    layers = _require_lora(model)
    if merged := [n for n, layer in layers.items() if layer.merged]:
        raise ValueError(f"LoRA layers are already merged ({merged[0]}, ...); call unmerge_lora first")
    for layer in layers.values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo `merge_lora`: the base weights come back (up to float rounding) and the adapters apply again."""
    layers = _require_lora(model)
    if unmerged := [n for n, layer in layers.items() if not layer.merged]:
        raise ValueError(f"LoRA layers are not merged ({unmerged[0]}, ...); nothing to unmerge")
    for layer in layers.values():
        layer.unmerge()
    return model


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put plain `nn.Linear`s back: with the active adapter merged in (`merge=True`) or dropped. Saved modules
    become the active adapter's plain copy."""
    for name, layer in _require_lora(model).items():
        if merge and not layer.merged:
            layer.merge()
        elif not merge and layer.merged:
            layer.unmerge()
        replace_module(model, name, layer.base)
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSave)]:
        replace_module(model, name, module.copies[module.active] if module.active in module.copies else module.original)
    return model


def _require_lora(model: nn.Module) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("this model has no LoRA layers; call apply_lora first")
    return layers


# --------------------------------------------------------------------------------------------------
# peft's files: adapter_config.json + adapter_model.safetensors, module paths of the Hugging Face model.
# --------------------------------------------------------------------------------------------------
PEFT_LEAVES = {"A.weight": "lora_A.weight", "B.weight": "lora_B.weight", "magnitude": "lora_magnitude_vector"}
# peft config fields that change the computation in ways we do not reproduce, with their neutral values.
UNSUPPORTED = {"rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "lora_bias": False,
               "bias": "none", "fan_in_fan_out": False, "exclude_modules": None, "target_parameters": None,
               "layer_replication": None, "use_qalora": False, "use_bdlora": None, "trainable_token_indices": None}


def save_adapter(model: nn.Module, folder: str | Path, adapter_name: str = "default") -> Path:
    """Write adapter `adapter_name` as peft does, so `PeftModel.from_pretrained(hf_model, folder)` loads it."""
    layers = {n: layer for n, layer in lora_layers(model).items() if adapter_name in layer.adapters}
    if not layers:
        raise ValueError(f"this model has no LoRA adapter named {adapter_name!r}")
    config = next(iter(layers.values())).adapters[adapter_name].config
    tensors = {}
    for name, layer in layers.items():
        for leaf, tensor in layer.adapters[adapter_name].state_dict().items():
            tensors[peft_key(model, name, PEFT_LEAVES[leaf], "LORA")] = tensor
    saved = []
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave) and adapter_name in module.copies:
            saved.append(to_hf_path(model, name))
            for leaf, tensor in module.copies[adapter_name].state_dict().items():
                tensors[peft_key(model, name, leaf, "LORA")] = tensor
    family = family_of(model)
    peft_config = {"peft_type": "LORA", "task_type": family.task_type(model) if family else None, "r": config.r,
                   "lora_alpha": config.alpha, "lora_dropout": config.dropout, "use_rslora": config.use_rslora,
                   "use_dora": config.use_dora, "target_modules": sorted(to_hf_path(model, n) for n in layers),
                   "modules_to_save": saved or None, "init_lora_weights": True, "inference_mode": True,
                   "base_model_name_or_path": None, **UNSUPPORTED, "fan_in_fan_out": fan_in_fan_out(model, layers)}
    return write_adapter(folder, peft_config, tensors)



def load_adapter(model: nn.Module, folder: str | Path, adapter_name: str = "default") -> nn.Module:
    """Load the LoRA or DoRA adapter that peft (or `save_adapter`) wrote in `folder` as `adapter_name`, and make
    it the active one. The adapter is added, or, if `apply_lora` already gave the model one of that name, filled
    in: then its layers and settings must be the file's."""
    peft_config, tensors = read_adapter(folder, expected_types=("LORA",))
    neutral_values = {**UNSUPPORTED, "fan_in_fan_out": peft_config.get("fan_in_fan_out", False)}  # checked below
    if odd := {k: peft_config[k] for k, neutral in neutral_values.items() if peft_config.get(k, neutral) != neutral}:
        raise ValueError(f"{folder}: peft options {odd} are not supported by tunelab's LoRA")
    prefix, ours_of = key_prefix("LORA"), {peft: ours for ours, peft in PEFT_LEAVES.items()}
    adapter_tensors, saved_tensors = {}, {}  # {our module path: {our leaf: tensor}}
    for key, tensor in tensors.items():
        if not key.startswith(prefix):
            raise ValueError(f"{folder}: tensor {key!r} is not named like a peft LoRA tensor ({prefix}...)")
        rest = key[len(prefix):]
        peft_leaf = next((leaf for leaf in ours_of if rest.endswith("." + leaf)), None)
        if peft_leaf is not None:
            path = from_hf_path(model, rest[: -len(peft_leaf) - 1])
            adapter_tensors.setdefault(path, {})[ours_of[peft_leaf]] = tensor
        else:
            hf_module, _, leaf = rest.rpartition(".")
            saved_tensors.setdefault(from_hf_path(model, hf_module), {})[leaf] = tensor
    if not adapter_tensors:
        raise ValueError(f"{folder}: the adapter file holds no lora_A / lora_B tensors")
    if bool(peft_config.get("fan_in_fan_out", False)) != fan_in_fan_out(model, adapter_tensors):
        raise ValueError(f"{folder}: fan_in_fan_out={peft_config.get('fan_in_fan_out')} does not match the adapted "
                         f"layers of {type(model).__name__} (Conv1D-stored layers need True, Linear ones False)")
    existing = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear))}
    if missing := sorted(set(adapter_tensors) - existing):
        raise ValueError(f"{folder}: adapted layers {missing} are not linear layers of {type(model).__name__}")
    get = peft_config.get
    config = LoRAConfig(r=get("r", 8), alpha=get("lora_alpha", 8), dropout=get("lora_dropout", 0.0),
                        targets=tuple(adapter_tensors), use_rslora=get("use_rslora", False),
                        use_dora=get("use_dora", False), modules_to_save=tuple(saved_tensors))
    present = {n: m.adapters[adapter_name] for n, m in lora_layers(model).items() if adapter_name in m.adapters}
    if not present:
        apply_lora(model, config, adapter_name)
    else:
        _check_same_adapter(present, config, f"{folder}: adapter {adapter_name!r} of this model")
        set_adapter(model, adapter_name)
    for path, leaves in adapter_tensors.items():
        _load_into(model.get_submodule(path).adapters[adapter_name], leaves, f"{folder}: {path}")
    for path, leaves in saved_tensors.items():
        module = model.get_submodule(path)
        if not isinstance(module, ModulesToSave) or adapter_name not in module.copies:
            raise ValueError(f"{folder}: the file holds a trained {path}, but adapter {adapter_name!r} of this model "
                             f"has no copy of it to train (modules_to_save)")
        _load_into(module.copies[adapter_name], leaves, f"{folder}: {path}")
    return model


def _check_same_adapter(present: dict[str, LoRAAdapter], config: LoRAConfig, what: str) -> None:
    """Refuse to fill an existing adapter from a file that adapts other layers or with other settings."""
    if set(present) != set(config.targets):
        raise ValueError(f"{what} adapts {sorted(present)}, the file {sorted(config.targets)}")
    ours = next(iter(present.values())).config
    settings = ("r", "alpha", "use_rslora", "use_dora")
    if differ := [f"{k}: model {getattr(ours, k)!r}, file {getattr(config, k)!r}" for k in settings
                  if getattr(ours, k) != getattr(config, k)]:
        raise ValueError(f"{what} has other settings than the file ({'; '.join(differ)})")


def _load_into(module: nn.Module, tensors: dict[str, Tensor], where: str) -> None:
    """Copy every tensor of `module`'s state dict from `tensors`, refusing missing, extra or misshapen ones."""
    state = module.state_dict()
    bad = sorted(set(state) ^ set(tensors)) + [k for k in tensors if k in state and tensors[k].shape != state[k].shape]
    if bad:
        raise ValueError(f"{where}: tensors {bad} are missing, unexpected or of the wrong shape "
                         f"(expected {({k: tuple(v.shape) for k, v in state.items()})})")
    module.load_state_dict(tensors)
