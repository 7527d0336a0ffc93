"""(IA)^3: rescale a frozen model's keys, values and feed-forward activations by learned vectors.

Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning" (https://arxiv.org/abs/2205.05638), section 3.3: "Infused Adapter by Inhibiting and Amplifying
Inner Activations" multiplies three activations element-wise by learned vectors l_k, l_v, l_ff:

    softmax(Q (l_k * K)^T / sqrt(D)) (l_v * V)        and        (l_ff * act(x W_1)) W_2

The vectors start at ones, so the adapted model starts as the pretrained one, and add only
2 C + d_ff numbers per layer. Scaling a layer's output (k_proj, v_proj) or its input (ff.linear2,
a "feedforward" module) is the same as scaling the rows or the columns of its weight, so the vectors
can be merged into the weights for free inference (`merge_ia3`). Files follow Hugging Face peft
(`ia3_l` of shape (out, 1), or (1, in) for feed-forward modules).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from tunelab.core.family import family_of
from tunelab.peft.inject import add_modules_to_save, find_targets, matches, replace_module, saved_module_tensors
from tunelab.peft.saving import fan_in_fan_out, peft_key, read_adapter, split_peft_key, to_hf_path, write_adapter

ADAPTER_NAME = "default"  # peft's name for a single adapter; it never appears in the saved file
PEFT_LEAF = "ia3_l"


@dataclass
class IA3Config:
    """Which linear layers (IA)^3 rescales (Liu et al. 2022, section 3.3).

    Args:
        targets: module-name suffixes, or one regex matching whole names, of the layers to adapt. The
            default is the paper's: keys, values and the feed-forward down-projection of every layer.
        feedforward: which of the targets get their *input* scaled (l_ff acts on the d_ff activations
            that enter ff.linear2); the others get their output scaled.
        modules_to_save: modules trained in full next to the vectors (the new classification head);
            use () for a model without a "classifier".
    """

    targets: str | Sequence[str] = ("k_proj", "v_proj", "ff.linear2")
    feedforward: str | Sequence[str] = ("ff.linear2",)
    modules_to_save: tuple[str, ...] = ("classifier",)

    def __post_init__(self):
        for field in ("targets", "feedforward"):
            value = getattr(self, field)
            if not isinstance(value, str):
                setattr(self, field, tuple(value))
        if isinstance(self.feedforward, str):
            re.compile(self.feedforward)
        elif any(not isinstance(f, str) or not f for f in self.feedforward):
            raise ValueError(f"feedforward must be a regex or a list of module-name suffixes, got {self.feedforward!r}")
        self.modules_to_save = tuple(self.modules_to_save)


class IA3Linear(nn.Module):
    """A frozen nn.Linear whose output (or, for a feed-forward module, input) is scaled element-wise by a
    learned vector l initialised to ones:  y = l * (x W^T + b)   or   y = (l * x) W^T + b.

    Args:
        base: the pretrained layer (its parameters are frozen).
        feedforward: scale the input (d_in numbers) instead of the output (d_out numbers).
    """

    def __init__(self, base: nn.Linear, feedforward: bool = False):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"IA3Linear wraps an nn.Linear, got {type(base).__name__}")
        self.base = base
        self.feedforward = feedforward
        for p in base.parameters():
            p.requires_grad_(False)
        n = base.in_features if feedforward else base.out_features
        self.scale = nn.Parameter(torch.ones(n, device=base.weight.device))  # l: (in,) or (out,)
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., out)."""
        if self.merged:  # l already lives in the weight
            return self.base(x)
        if self.feedforward:
            return self.base(x * self.scale)  # (..., out)
        return self.base(x) * self.scale  # (..., out)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """Fold l into the base weights (columns for an input scale, rows and bias for an output scale)."""
        if self.merged:
            raise ValueError("this IA3Linear is already merged; merging again would apply the scale twice")
        w = self.base.weight  # (out, in)
        if self.feedforward:
            w.mul_(self.scale.to(w.dtype)[None, :])  # (l * x) W^T = x (W diag(l))^T
        else:
            w.mul_(self.scale.to(w.dtype)[:, None])  # l * (x W^T + b) = x (diag(l) W)^T + l * b
            if self.base.bias is not None:
                self.base.bias.mul_(self.scale.to(w.dtype))
        self.merged = True
        return self.base

    def extra_repr(self) -> str:
        return f"feedforward={self.feedforward}, merged={self.merged}"


def ia3_layers(model: nn.Module) -> dict[str, IA3Linear]:
    """{module path: IA3Linear} of every adapted layer, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, IA3Linear)}


def apply_ia3(model: nn.Module, config: IA3Config | None = None, **overrides) -> nn.Module:
    """Freeze `model` and wrap every targeted nn.Linear in an IA3Linear (in place); return the model.

    The modules_to_save get trainable copies. Raises a ValueError when a target or module_to_save matches
    nothing (listing the modules that exist), when a feedforward entry is not among the targets, or when
    the model already has (IA)^3 layers.
    """
    config = IA3Config(**{**asdict(config or IA3Config()), **overrides})
    if ia3_layers(model):
        raise ValueError("this model already has IA3 layers; apply_ia3 adapts a model once")
    names = find_targets(model, config.targets, method="IA3")
    feedforward = {n for n in names if matches(n, config.feedforward)}
    if not isinstance(config.feedforward, str):
        stray = [f for f in config.feedforward if not any(matches(n, [f]) for n in names)]
        if stray:
            raise ValueError(f"feedforward {stray} matches none of the IA3 targets {list(config.targets)}: "
                             "feedforward modules must be a subset of the targets")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        replace_module(model, name, IA3Linear(model.get_submodule(name), feedforward=name in feedforward))
    add_modules_to_save(model, config.modules_to_save, ADAPTER_NAME)
    return model


def merge_ia3(model: nn.Module) -> nn.Module:
    """Fold every IA3 vector into its layer's weights and put the plain nn.Linear back (in place)."""
    layers = ia3_layers(model)
    if not layers:
        raise ValueError("this model has no IA3 layers to merge (not adapted, or already merged)")
    for name, layer in layers.items():
        replace_module(model, name, layer.merge())
    return model


# ---------------------------------------------------------------------------------------------------
# peft's on-disk layout: base_model.model.<HF path>.ia3_l, (out, 1) or (1, in) for feed-forward layers.
# ---------------------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, folder: str | Path) -> Path:
    """Write the IA3 vectors and the trained copies of the modules_to_save in peft's layout."""
    layers = ia3_layers(model)
    if not layers:
        raise ValueError("this model has no IA3 layers to save")
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(f"IA3 layers {merged} are merged into their weights; save before merging")
    tensors = {}
    for name, layer in layers.items():
        shape = (1, -1) if layer.feedforward else (-1, 1)
        tensors[peft_key(model, name, PEFT_LEAF, "IA3")] = layer.scale.detach().reshape(shape).cpu().contiguous()
    saved = sorted({name.rpartition(".")[0] for name in saved_module_tensors(model, ADAPTER_NAME)})
    for name, tensor in saved_module_tensors(model, ADAPTER_NAME).items():
        path, _, leaf = name.rpartition(".")
        tensors[peft_key(model, path, leaf, "IA3")] = tensor.detach().cpu().contiguous()
    # peft's task_type picks the PeftModel class that `PeftModel.from_pretrained` builds around the model
    family = family_of(model)
    task_type = family.task_type(model) if family else None
    config = dict(peft_type="IA3", task_type=task_type, inference_mode=True,
                  target_modules=[to_hf_path(model, n) for n in layers],
                  feedforward_modules=[to_hf_path(model, n) for n, layer in layers.items() if layer.feedforward],
                  modules_to_save=[to_hf_path(model, n) for n in saved] or None,
                  fan_in_fan_out=fan_in_fan_out(model, layers),
                  init_ia3_weights=True, base_model_name_or_path=None)
    return write_adapter(folder, config, tensors)


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Load an IA3 adapter saved by peft or by `save_adapter` into `model` (in place); return it.

    A model without IA3 layers is first adapted with the layers the file names (feed-forward ones taken
    from its feedforward_modules, as peft matches them); an adapted model must have exactly those layers.
    """
    config, tensors = read_adapter(folder, expected_types=("IA3",))
    vectors, heads = {}, {}
    for key, tensor in tensors.items():
        found = split_peft_key(model, key, "IA3", (PEFT_LEAF,))
        if found is not None:
            vectors[found[0]] = tensor
        else:
            found = split_peft_key(model, key, "IA3", ("weight", "bias"))
            if found is None:
                raise ValueError(f"{folder} holds {key!r}, which is neither an IA3 vector nor a module_to_save")
            heads[found] = tensor
    if not ia3_layers(model):
        feedforward = config.get("feedforward_modules") or []
        hf = {name: to_hf_path(model, name) for name in vectors}
        is_ff = [n for n in vectors if (re.fullmatch(feedforward, hf[n]) if isinstance(feedforward, str)
                                         else any(hf[n].endswith(f) for f in feedforward))]
        apply_ia3(model, targets=sorted(vectors), feedforward=sorted(is_ff),
                  modules_to_save=sorted({path for path, _ in heads}))
    layers = ia3_layers(model)
    if any(layer.merged for layer in layers.values()):
        raise ValueError("this model's IA3 layers are merged into their weights; load into an unmerged model")
    if set(layers) != set(vectors):
        raise ValueError(f"{folder} adapts {sorted(vectors)}, this model's IA3 layers are {sorted(layers)}")
    expected_heads = {tuple(n.rsplit(".", 1)): t for n, t in saved_module_tensors(model, ADAPTER_NAME).items()}
    if set(expected_heads) != set(heads):
        raise ValueError(f"{folder} holds trained modules {sorted(heads)}, this model trains {sorted(expected_heads)}")
    problems = [f"{name}: file {tuple(t.shape)} vs model {tuple(layers[name].scale.shape)}"
                for name, t in vectors.items() if t.numel() != layers[name].scale.numel()]
    problems += [f"{'.'.join(k)}: file {tuple(t.shape)} vs model {tuple(expected_heads[k].shape)}"
                 for k, t in heads.items() if t.shape != expected_heads[k].shape]
    if problems:
        raise ValueError(f"shape mismatches in {folder}: {', '.join(problems)}")
    with torch.no_grad():
        for name, tensor in vectors.items():
            layers[name].scale.copy_(tensor.flatten())
        for key, tensor in heads.items():
            expected_heads[key].copy_(tensor)  # state_dict tensors share storage with the parameters
    return model
