"""Pruning: zero the weights that matter least, by masks (unstructured) or by removing whole heads and neurons.

Magnitude pruning (Han et al. 2015, https://arxiv.org/abs/1506.02626) keeps a binary mask M next to a weight and
trains W * M. The functions follow torch.nn.utils.prune's semantics, so their masks equal torch's:
    a float amount a prunes round(a * n) of the n still-unpruned entries (or channels), an int prunes that many;
    a second call prunes only among the still-unpruned entries (torch's PruningContainer);
    ties are broken as torch.topk breaks them on the same scores.
Where torch re-parametrizes (weight = weight_orig * mask in a forward hook), a parameter here keeps its name and
is multiplied in place; the mask is a bool buffer `<name>_mask` (1 byte per entry, torch's is a float) that
`apply_masks` re-applies after every optimizer step. Importance is the current (masked) weight; torch scores the
unmasked original, which differs only when two kinds of pruning are mixed on one tensor.
Gradual pruning raises the sparsity on the cubic schedule of Zhu & Gupta 2017 (https://arxiv.org/abs/1710.01878).
Structured pruning of attention heads (Michel et al. 2019, https://arxiv.org/abs/1905.10650) and feed-forward
neurons masks them first and then *removes* them (`shrink_structure`): a smaller, faster model, same outputs.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tunelab.core.attention import MultiHeadAttention
from tunelab.core.layers import EncoderLayer, FeedForward
from tunelab.quant.select import select_layers

MASK_SUFFIX = "_mask"
# The output layer is small and its weights are the last word on every class: it is usually left dense.
# skip=None keeps whichever of these top-level modules the model has.
DEFAULT_SKIP = ("classifier", "head")
SCOPES = ("layer", "global")


# ---------------------------------------------------------------- masks on one parameter


def _parameter(module: nn.Module, name: str) -> nn.Parameter:
    param = module._parameters.get(name) if isinstance(name, str) else None
    if param is None:
        names = [n for n, p in module.named_parameters(recurse=False)]
        raise ValueError(f"{type(module).__name__} has no parameter {name!r}; its parameters are {names}")
    return param


def get_mask(module: nn.Module, name: str = "weight") -> Tensor:
    """The bool mask of `module.<name>` (True = kept); all True when it was never pruned."""
    mask = getattr(module, name + MASK_SUFFIX, None)
    return torch.ones_like(_parameter(module, name), dtype=torch.bool) if mask is None else mask


def set_mask(module: nn.Module, name: str, mask: Tensor) -> None:
    """Store `mask` as the buffer `<name>_mask` and zero the pruned entries of the parameter in place
    (torch.nn.utils.prune.custom_from_mask; a mask only ever removes entries, it never revives them)."""
    param = _parameter(module, name)
    if mask.shape != param.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {name} shape {tuple(param.shape)}")
    mask = mask.to(device=param.device, dtype=torch.bool)
    if hasattr(module, name + MASK_SUFFIX):
        getattr(module, name + MASK_SUFFIX).copy_(mask)
    else:
        module.register_buffer(name + MASK_SUFFIX, mask.clone())
    with torch.no_grad():
        param.mul_(mask)


def _check_amount(amount) -> None:
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
        raise TypeError(f"amount must be a float in [0, 1] or an int count, got {type(amount).__name__} {amount!r}")
    if isinstance(amount, numbers.Integral) and amount < 0:
        raise ValueError(f"amount={amount} is a negative count; an int amount counts entries to prune (>= 0)")
    if not isinstance(amount, numbers.Integral) and not 0.0 <= float(amount) <= 1.0:
        raise ValueError(f"amount={amount} is outside [0, 1]; a float amount is the fraction to prune")


def _count(amount, available: int, what: str) -> int:
    """How many of the `available` still-unpruned entries `amount` prunes: round(a * n) or the int itself."""
    _check_amount(amount)
    k = int(amount) if isinstance(amount, numbers.Integral) else round(float(amount) * available)
    if k > available:
        raise ValueError(f"amount={amount} asks to prune {k} {what}, but only {available} are still unpruned")
    return k


def l1_unstructured(module: nn.Module, name: str = "weight", amount: float | int = 0.5) -> Tensor:
    """Prune the `amount` entries of smallest |w| among the unpruned ones (torch's l1_unstructured).
    Returns the mask."""
    param, mask = _parameter(module, name), get_mask(module, name).flatten()
    alive = mask.nonzero().squeeze(1)  # (n_alive,) flat indices, in row-major order like torch's t[mask == 1]
    k = _count(amount, alive.numel(), f"entries of {name}")
    new = mask.clone()
    if k:
        scores = param.detach().flatten()[alive].abs()  # (n_alive,)
        new[alive[torch.topk(scores, k, largest=False).indices]] = False
    set_mask(module, name, new.view(param.shape))
    return get_mask(module, name)


def random_unstructured(module: nn.Module, name: str = "weight", amount: float | int = 0.5,
                        generator: torch.Generator | None = None) -> Tensor:
    """Prune `amount` random unpruned entries (torch's random_unstructured: one uniform draw per unpruned entry,
    the k largest draws are pruned; with torch's global generator in the same state, the same mask)."""
    param, mask = _parameter(module, name), get_mask(module, name).flatten()
    alive = mask.nonzero().squeeze(1)  # (n_alive,)
    k = _count(amount, alive.numel(), f"entries of {name}")
    new = mask.clone()
    if k:
        draws = torch.rand(alive.numel(), generator=generator, dtype=param.dtype, device=param.device)
        new[alive[torch.topk(draws, k).indices]] = False
    set_mask(module, name, new.view(param.shape))
    return get_mask(module, name)


def ln_structured(module: nn.Module, name: str = "weight", amount: float | int = 0.5, n: float = 2,
                  dim: int = 0) -> Tensor:
    """Prune whole slices along `dim` of smallest L_n norm among the unpruned ones (torch's ln_structured):
    dim=0 removes rows of a Linear weight (output features), dim=1 columns (input features).

    Args:
        n: the norm's order (1, 2, float("inf")). dim: the dimension whose slices are channels.
    """
    param, mask = _parameter(module, name), get_mask(module, name)
    if param.dim() < 2:
        raise ValueError(f"structured pruning needs a tensor of 2 or more dims; {name} has shape {tuple(param.shape)}")
    if not -param.dim() <= dim < param.dim():
        raise ValueError(f"dim={dim} is out of range for {name} of shape {tuple(param.shape)}")
    if isinstance(n, bool) or not isinstance(n, numbers.Real) or not n > 0:
        raise ValueError(f"n={n!r} must be a positive norm order (1, 2, inf)")
    dim = dim % param.dim()
    others = [d for d in range(param.dim()) if d != dim]
    alive = mask.sum(dim=others).nonzero().squeeze(1)  # (n_alive,) channels not yet entirely pruned
    k = _count(amount, alive.numel(), f"channels of {name} along dim {dim}")
    if k:
        norms = torch.linalg.vector_norm(param.detach().index_select(dim, alive), ord=n, dim=others)  # (n_alive,)
        kept = alive[torch.topk(norms, alive.numel() - k).indices]  # torch keeps the largest: same ties
        channel_kept = torch.zeros(param.shape[dim], dtype=torch.bool, device=param.device)
        channel_kept[kept] = True
        shape = [1] * param.dim()
        shape[dim] = -1
        set_mask(module, name, mask & channel_kept.view(shape))
    return get_mask(module, name)


def global_unstructured(targets: list[tuple[nn.Module, str]], amount: float | int) -> None:
    """Prune the `amount` smallest |w| among the unpruned entries of all `targets` together (torch's
    global_unstructured with L1Unstructured): layers whose weights are small lose more."""
    targets = list(targets)
    if not targets:
        raise ValueError("global_unstructured needs at least one (module, name) target")
    params = [_parameter(module, name) for module, name in targets]
    masks = torch.cat([get_mask(module, name).flatten() for module, name in targets])  # (N,)
    alive = masks.nonzero().squeeze(1)
    k = _count(amount, alive.numel(), "entries of the targets together")
    if k:
        scores = torch.cat([p.detach().flatten() for p in params])[alive].abs()  # (n_alive,)
        masks[alive[torch.topk(scores, k, largest=False).indices]] = False
    start = 0
    for (module, name), param in zip(targets, params):
        set_mask(module, name, masks[start:start + param.numel()].view(param.shape))
        start += param.numel()


# ---------------------------------------------------------------- masks across a model


def masked_parameters(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(module name, module, parameter name) of every parameter that carries a mask."""
    found = []
    for module_name, module in model.named_modules():
        for buffer_name in list(module._buffers):
            name = buffer_name.removesuffix(MASK_SUFFIX)
            if buffer_name.endswith(MASK_SUFFIX) and module._parameters.get(name) is not None:
                found.append((module_name, module, name))
    return found


@torch.no_grad()
def apply_masks(model: nn.Module) -> None:
    """Zero every pruned entry again: an optimizer step (momentum, weight decay) moves them off zero.
    In training: `train_model(..., after_step=lambda step: apply_masks(model))` (GradualPruner does it too)."""
    for _, module, name in masked_parameters(model):
        module._parameters[name].mul_(module._buffers[name + MASK_SUFFIX])


def make_permanent(model: nn.Module) -> nn.Module:
    """Apply every mask one last time and drop it: plain parameters with zeros (torch's prune.remove)."""
    apply_masks(model)
    for _, module, name in masked_parameters(model):
        del module._buffers[name + MASK_SUFFIX]
    return model


def prunable_modules(model: nn.Module, skip=None, kinds=(nn.Linear,)) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module of `kinds` (nn.Linear; add nn.Embedding to prune word vectors too)
    outside `skip` (module names or dotted prefixes; None: the output layer, DEFAULT_SKIP)."""
    if skip is None:
        children = dict(model.named_children())
        skip = [name for name in DEFAULT_SKIP if name in children]
    return select_layers(model, tuple(kinds), skip, "prune")


def magnitude_prune(model: nn.Module, amount: float | int, scope: str = "layer", skip=None,
                    kinds=(nn.Linear,)) -> None:
    """L1-magnitude pruning of the weight of every module of `kinds` outside `skip`: `amount` of each one
    ("layer"), or of all of them ranked together ("global")."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {SCOPES}")
    modules = prunable_modules(model, skip, kinds)
    if scope == "global":
        global_unstructured([(m, "weight") for _, m in modules], amount)
        return
    for _, module in modules:
        l1_unstructured(module, "weight", amount)


@dataclass
class SparsityReport:
    """Zeros per tensor (every masked parameter and every Linear weight) and in total."""

    layers: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (zeros, numel)

    @property
    def zeros(self) -> int:
        return sum(z for z, _ in self.layers.values())

    @property
    def numel(self) -> int:
        return sum(n for _, n in self.layers.values())

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    def layer_sparsity(self) -> dict[str, float]:
        return {name: z / n for name, (z, n) in self.layers.items()}

    def table(self) -> str:
        width = max(len(name) for name in [*self.layers, "total"])
        lines = [f"{'':{width}}  {'zeros':>10}  {'of':>10}  {'sparsity':>8}"]
        for name, (z, n) in [*self.layers.items(), ("total", (self.zeros, self.numel))]:
            lines.append(f"{name:{width}}  {z:>10,}  {n:>10,}  {z / n if n else 0.0:>8.1%}")
        return "\n".join(lines)


def sparsity_report(model: nn.Module) -> SparsityReport:
    """Count the exact zeros of every masked parameter and every nn.Linear weight, per tensor and in total."""
    report, seen = SparsityReport(), set()
    tensors = [(f"{m}.{n}" if m else n, getattr(module, n)) for m, module, n in masked_parameters(model)]
    tensors += [(f"{m}.weight" if m else "weight", module.weight) for m, module in model.named_modules()
                if isinstance(module, nn.Linear)]
    for name, tensor in tensors:
        if name not in seen:
            seen.add(name)
            report.layers[name] = (tensor.numel() - int(tensor.count_nonzero()), tensor.numel())
    return report


# ---------------------------------------------------------------- gradual pruning (Zhu & Gupta 2017)


def cubic_sparsity(step: int, initial: float, final: float, start_step: int, n_steps: int, interval: int) -> float:
    """The sparsity at `step` (Zhu & Gupta 2017, eq. 1): s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3.

    Pruning happens at t = t0, t0 + dt, ..., t0 + n dt; between events the sparsity stays at the last event's
    value, after the last one it stays at s_f (exactly). Before t0 nothing is pruned: 0.

    Args:
        initial, final: s_i <= s_f, in [0, 1]. start_step: t0 >= 0. n_steps: n >= 1 pruning events after t0.
        interval: dt >= 1 optimizer steps between events.
    """
    if not 0.0 <= initial <= final <= 1.0:
        raise ValueError(f"sparsities must satisfy 0 <= initial ({initial}) <= final ({final}) <= 1")
    for name, value, low in (("start_step", start_step, 0), ("n_steps", n_steps, 1), ("interval", interval, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if step < start_step:
        return 0.0
    events = min((step - start_step) // interval, n_steps)  # pruning events so far, after the one at t0
    return final + (initial - final) * (1.0 - events / n_steps) ** 3


class GradualPruner:
    """Magnitude pruning on the cubic schedule, as train_model's `after_step`: at each event it prunes the
    weights of the modules of `kinds` outside `skip` up to round(s_t * numel) pruned entries (per module, or
    over all of them for scope="global"); every step it re-applies the masks. From `end_step` on the sparsity
    is exactly `final`."""

    def __init__(self, model: nn.Module, final: float, *, initial: float = 0.0, start_step: int = 0,
                 n_steps: int = 10, interval: int = 10, scope: str = "layer", skip=None,
                 kinds=(nn.Linear,)):
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; expected one of {SCOPES}")
        cubic_sparsity(start_step, initial, final, start_step, n_steps, interval)  # validates the schedule
        self.model, self.scope = model, scope
        self.schedule = dict(initial=initial, final=final, start_step=start_step, n_steps=n_steps, interval=interval)
        self.modules = [m for _, m in prunable_modules(model, skip, kinds)]
        self.sparsity = 0.0  # the target reached so far

    @property
    def end_step(self) -> int:
        """The step of the last event, where the sparsity reaches `final`."""
        return self.schedule["start_step"] + self.schedule["n_steps"] * self.schedule["interval"]

    def __call__(self, step: int) -> None:
        target = cubic_sparsity(step, **self.schedule)
        if target > self.sparsity:  # an event (or one missed, e.g. t0 = 0 when steps count from 1)
            self.prune_to(target)
            self.sparsity = target
        apply_masks(self.model)

    def prune_to(self, sparsity: float) -> None:
        """Prune the smallest unpruned weights until round(sparsity * numel) are pruned."""
        pruned = [int((~get_mask(m, "weight")).sum()) for m in self.modules]
        if self.scope == "global":
            total = sum(m.weight.numel() for m in self.modules)
            global_unstructured([(m, "weight") for m in self.modules], max(0, round(sparsity * total) - sum(pruned)))
            return
        for module, done in zip(self.modules, pruned):
            l1_unstructured(module, "weight", max(0, round(sparsity * module.weight.numel()) - done))


# ---------------------------------------------------------------- heads and neurons, then a smaller model


def encoder_layers(model: nn.Module) -> dict[str, EncoderLayer]:
    """Every EncoderLayer of `model` by name (BertModel, MiniLM, TransformerClassifier)."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, EncoderLayer)}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no EncoderLayer (tunelab.core.layers) to prune")
    return layers


def _head_slice(attn: MultiHeadAttention, h: int) -> slice:
    return slice(h * attn.d_head, (h + 1) * attn.d_head)


def head_scores(attn: MultiHeadAttention, n: float = 2) -> Tensor:
    """(H,) importance of each head: ||W_V^h||_n * ||W_O^h||_n, its rows of v_proj times its columns of out_proj.
    A head outputs A (x W_V^h) W_O^h with attention rows A summing to 1, so this bounds its output's size;
    q and k only choose where it looks. A removed head (zero out_proj columns) scores 0."""
    value = attn.v_proj.weight.detach().view(attn.n_heads, attn.d_head, -1)  # (H, D, C)
    out = attn.out_proj.weight.detach().view(-1, attn.n_heads, attn.d_head)  # (C, H, D)
    return torch.linalg.vector_norm(value, ord=n, dim=(1, 2)) * torch.linalg.vector_norm(out, ord=n, dim=(0, 2))


def neuron_scores(ff: FeedForward, n: float = 2) -> Tensor:
    """(d_ff,) importance of each hidden neuron: ||linear1 row||_n * ||linear2 column||_n (biases left out,
    as ln_structured leaves them out)."""
    w_in = torch.linalg.vector_norm(ff.linear1.weight.detach(), ord=n, dim=1)  # (d_ff,)
    return w_in * torch.linalg.vector_norm(ff.linear2.weight.detach(), ord=n, dim=0)  # (d_ff,)


def alive_heads(attn: MultiHeadAttention) -> list[int]:
    """Heads whose out_proj columns are not all zero: the others add nothing to the output, whatever q/k/v."""
    out = attn.out_proj.weight.detach().view(-1, attn.n_heads, attn.d_head)  # (C, H, D)
    return out.ne(0).any(dim=2).any(dim=0).nonzero().squeeze(1).tolist()


def alive_neurons(ff: FeedForward) -> list[int]:
    """Hidden neurons whose linear2 column is not all zero."""
    return ff.linear2.weight.detach().ne(0).any(dim=0).nonzero().squeeze(1).tolist()


def mask_heads(attn: MultiHeadAttention, heads: list[int]) -> None:
    """Zero (by masks) every weight of `heads`: their q/k/v rows and biases and their out_proj columns."""
    bad = [h for h in heads if not 0 <= h < attn.n_heads]
    if bad:
        raise ValueError(f"heads {bad} do not exist in an attention of {attn.n_heads} heads")
    if set(alive_heads(attn)) <= set(heads):
        raise ValueError(f"pruning heads {sorted(heads)} would remove every head of the layer; keep at least one")
    keep = torch.ones(attn.n_heads * attn.d_head, dtype=torch.bool, device=attn.out_proj.weight.device)
    for h in heads:
        keep[_head_slice(attn, h)] = False
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        set_mask(proj, "weight", get_mask(proj, "weight") & keep[:, None])
        if proj.bias is not None:
            set_mask(proj, "bias", get_mask(proj, "bias") & keep)
    set_mask(attn.out_proj, "weight", get_mask(attn.out_proj, "weight") & keep[None, :])


def mask_neurons(ff: FeedForward, neurons: list[int]) -> None:
    """Zero (by masks) `neurons`: their linear1 rows and biases and their linear2 columns."""
    d_ff = ff.linear1.out_features
    bad = [j for j in neurons if not 0 <= j < d_ff]
    if bad:
        raise ValueError(f"neurons {bad[:5]} do not exist in a feed-forward of width {d_ff}")
    if set(alive_neurons(ff)) <= set(neurons):
        raise ValueError(f"pruning {len(neurons)} neurons would remove every neuron of the layer; keep at least one")
    keep = torch.ones(d_ff, dtype=torch.bool, device=ff.linear1.weight.device)
    keep[list(neurons)] = False
    set_mask(ff.linear1, "weight", get_mask(ff.linear1, "weight") & keep[:, None])
    set_mask(ff.linear1, "bias", get_mask(ff.linear1, "bias") & keep)
    set_mask(ff.linear2, "weight", get_mask(ff.linear2, "weight") & keep[None, :])


def _lowest(scores: Tensor, alive: list[int], amount, what: str) -> list[int]:
    """The `amount` lowest-scoring of the `alive` indices (ties as torch.topk breaks them)."""
    k = _count(amount, len(alive), what)
    if k == len(alive) and k:
        raise ValueError(f"amount={amount} would prune all {k} remaining {what}; keep at least one")
    picked = torch.topk(scores[alive], k, largest=False).indices.tolist() if k else []
    return sorted(alive[i] for i in picked)


def _prune_units(model: nn.Module, amount, part: str, what: str, scores, alive, mask) -> dict[str, list[int]]:
    """In every encoder layer, mask the `amount` lowest-scoring units still alive in `layer.<part>`."""
    pruned = {}
    for name, layer in encoder_layers(model).items():
        module = getattr(layer, part)
        units = _lowest(scores(module), alive(module), amount, f"{what} of {name}")
        if units:
            mask(module, units)
        pruned[name] = units
    return pruned


def prune_heads(model: nn.Module, amount: float | int, n: float = 2) -> dict[str, list[int]]:
    """Mask the `amount` lowest-scoring unpruned heads (`head_scores`) of every encoder layer; returns the heads
    pruned per layer name. Masks only: call `shrink_structure` to remove them."""
    return _prune_units(model, amount, "attn", "heads", lambda attn: head_scores(attn, n), alive_heads, mask_heads)


def prune_neurons(model: nn.Module, amount: float | int, n: float = 2) -> dict[str, list[int]]:
    """Mask the `amount` lowest-scoring unpruned feed-forward neurons (`neuron_scores`) of every encoder layer."""
    return _prune_units(model, amount, "ff", "neurons", lambda ff: neuron_scores(ff, n), alive_neurons, mask_neurons)


def _sliced_linear(linear: nn.Linear, rows: Tensor | None = None, cols: Tensor | None = None) -> nn.Linear:
    """A new nn.Linear holding the `rows` (outputs) and `cols` (inputs) of `linear`, masks included."""
    if type(linear) is not nn.Linear:
        raise TypeError(f"can only shrink a plain nn.Linear, got {type(linear).__name__} (merge adapters first)")
    tensors = {"weight": linear.weight.detach(), "bias": None if linear.bias is None else linear.bias.detach()}
    tensors.update({name + MASK_SUFFIX: getattr(linear, name + MASK_SUFFIX, None) for name in ("weight", "bias")})
    for key, t in tensors.items():
        if t is not None:
            t = t if rows is None else t[rows]
            tensors[key] = t if cols is None or t.dim() < 2 else t[:, cols]
    weight = tensors["weight"]  # (out, in)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None:
            new.bias.copy_(tensors["bias"])
    for name in ("weight", "bias"):
        if tensors[name + MASK_SUFFIX] is not None:
            new.register_buffer(name + MASK_SUFFIX, tensors[name + MASK_SUFFIX].clone())
    new.requires_grad_(linear.weight.requires_grad)
    return new


def _shrink_layer(layer: EncoderLayer, heads: list[int], neurons: list[int]) -> None:
    """Keep only `heads` of the attention and `neurons` of the feed-forward of `layer`, in place."""
    attn, device = layer.attn, layer.attn.out_proj.weight.device
    inner = torch.cat([torch.arange(attn.d_head) + h * attn.d_head for h in heads]).to(device)  # (H' * D,)
    new = MultiHeadAttention(attn.d_model, len(heads), dropout=attn.dropout, bias=attn.q_proj.bias is not None,
                             impl=attn.impl, d_head=attn.d_head)
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(new, name, _sliced_linear(getattr(attn, name), rows=inner))
    new.out_proj = _sliced_linear(attn.out_proj, cols=inner)
    layer.attn = new.train(attn.training)
    kept = torch.tensor(neurons, dtype=torch.long, device=device)
    layer.ff.linear1 = _sliced_linear(layer.ff.linear1, rows=kept)
    layer.ff.linear2 = _sliced_linear(layer.ff.linear2, cols=kept)


def shrink_structure(model: nn.Module) -> dict[str, dict[str, int]]:
    """Remove every head whose out_proj columns are zero and every neuron whose linear2 column is zero from each
    encoder layer (exact: they add nothing), in place. Returns the structure, per layer name
    {"n_heads", "d_head", "d_ff"}, that `apply_structure` rebuilds on a fresh model before loading weights."""
    structure = {}
    for name, layer in encoder_layers(model).items():
        heads, neurons = alive_heads(layer.attn), alive_neurons(layer.ff)
        if not heads or not neurons:
            raise ValueError(f"{name} has {len(heads)} heads and {len(neurons)} neurons left; it needs one of each")
        _shrink_layer(layer, heads, neurons)
        structure[name] = {"n_heads": len(heads), "d_head": layer.attn.d_head, "d_ff": len(neurons)}
    return structure


def apply_structure(model: nn.Module, structure: dict[str, dict[str, int]]) -> nn.Module:
    """Give a freshly built model the shapes `shrink_structure` returned (keeping its first heads and neurons),
    so that the shrunk model's saved weights load into it with load_state_dict."""
    layers = encoder_layers(model)
    for name, shape in structure.items():
        if name not in layers:
            raise ValueError(f"structure names layer {name!r}, which {type(model).__name__} lacks; "
                             f"its encoder layers are {list(layers)}")
        layer = layers[name]
        n_heads, d_head, d_ff = shape.get("n_heads"), shape.get("d_head"), shape.get("d_ff")
        if d_head != layer.attn.d_head:
            raise ValueError(f"{name}: structure has d_head={d_head!r}, the model's heads are {layer.attn.d_head} wide")
        if not isinstance(n_heads, int) or not 1 <= n_heads <= layer.attn.n_heads:
            raise ValueError(f"{name}: n_heads={n_heads!r} must be an int in [1, {layer.attn.n_heads}]")
        if not isinstance(d_ff, int) or not 1 <= d_ff <= layer.ff.linear1.out_features:
            raise ValueError(f"{name}: d_ff={d_ff!r} must be an int in [1, {layer.ff.linear1.out_features}]")
        _shrink_layer(layer, list(range(n_heads)), list(range(d_ff)))
    return model
