"""Uniform (integer) quantization: scales and zero points, three granularities, calibration, bit packing, QAT.

    q = clamp(round(x / s) + z, qmin, qmax)        x_hat = (q - z) * s

Symmetric: z = 0, s = absmax / qmax on a signed grid. Asymmetric: an unsigned grid [0, 2^b - 1] stretched
over [min(x, 0), max(x, 0)] with an integer z, so that 0.0 is exact (Jacob et al. 2018, arXiv 1712.05877,
eq. 1-2). One scale per tensor, per output channel, or per group of consecutive weights (as GPTQ and AWQ).
Quantization-aware training runs the forward pass on x_hat and passes gradients straight through the rounding
(Bengio et al. 2013); LSQ learns the step size s (Esser et al. 2020, arXiv 1902.08153).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tunelab.quant.select import select_layers

SCHEMES = ("symmetric", "asymmetric")
GRANULARITIES = ("tensor", "channel", "group")
CALIBRATIONS = ("minmax", "percentile", "mse")
PACK_BITS = (2, 4, 8)
MSE_RATIOS = torch.linspace(1.0, 0.2, 81)  # clipping ratios tried by "mse": 1.0, 0.99, ..., 0.2 (GPTQ's grid)


def check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")


def _check_choice(name: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {list(choices)}")


def quant_range(bits: int, scheme: str = "symmetric") -> tuple[int, int]:
    """(qmin, qmax) of the integer grid. Symmetric: the restricted signed range [-(2^(b-1) - 1), 2^(b-1) - 1],
    as LLM.int8() and bitsandbytes use ([-127, 127]: -x is representable whenever x is; torch.ao's qint8 also
    allows -128). Asymmetric: unsigned [0, 2^b - 1]."""
    check_bits(bits)
    _check_choice("scheme", scheme, SCHEMES)
    if scheme == "symmetric":
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


@dataclass
class QTensor:
    """A quantized tensor: integer `codes` (the input's shape; int8 symmetric, uint8 asymmetric), float32 `scale`
    and integer `zero_point` (None when symmetric), broadcastable against the codes in their blocked view:
    tensor () ; channel: shape[axis] along `axis`, 1 elsewhere ((out, 1) for axis 0 of a weight);
    group: (*shape[:-1], shape[-1] // group_size, 1) against codes viewed as (*shape[:-1], groups, group_size)."""

    codes: Tensor
    scale: Tensor
    zero_point: Tensor | None
    bits: int
    scheme: str
    granularity: str
    axis: int | None
    group_size: int | None
    shape: torch.Size

    def dequantize(self) -> Tensor:
        """x_hat = (q - z) * s, float32, in the input's shape."""
        codes = _blocked_view(self.codes, self.granularity, self.group_size).float()
        if self.zero_point is not None:
            codes = codes - self.zero_point.float()
        return (codes * self.scale).reshape(self.shape)

    @property
    def bits_per_param(self) -> float:
        """Stored bits per element: the codes, the fp32 scales and the zero points (b bits each, packed like codes)."""
        n = self.codes.numel()
        zero_points = 0 if self.zero_point is None else self.zero_point.numel() * self.bits
        return (n * self.bits + 32 * self.scale.numel() + zero_points) / n


def _blocked_view(x: Tensor, granularity: str, group_size: int | None) -> Tensor:
    """Groups need their own axis (*shape[:-1], groups, group_size); tensor and channel use x as it is."""
    if granularity == "group":
        return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
    return x


def _check_input(x: Tensor, granularity: str, axis: int, group_size: int | None) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"quantize takes a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor of shape {tuple(x.shape)}")
    if bad := int((~torch.isfinite(x)).sum()):
        raise ValueError(f"the tensor holds {bad} NaN or Inf values (of {x.numel()}); only finite values quantize")
    _check_choice("granularity", granularity, GRANULARITIES)
    if granularity != "tensor" and x.dim() == 0:
        raise ValueError(f"granularity {granularity!r} needs a tensor with at least one dimension, got a scalar")
    if granularity == "channel" and not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis {axis} is out of range for a tensor of shape {tuple(x.shape)}")
    if granularity == "group":
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
            raise ValueError(f"granularity 'group' needs a positive integer group_size, got {group_size!r}")
        if x.shape[-1] % group_size:
            raise ValueError(f"group_size {group_size} does not divide the last dimension {x.shape[-1]} "
                             f"of a tensor of shape {tuple(x.shape)}")


def _blocks(x: Tensor, granularity: str, axis: int, group_size: int | None) -> tuple[Tensor, list[int]]:
    """x as (n_blocks, block_len) rows that share one scale, and the shape those n_blocks scales take."""
    if granularity == "tensor":
        return x.reshape(1, -1), []
    if granularity == "channel":
        axis = axis % x.dim()
        shape = [x.shape[axis] if d == axis else 1 for d in range(x.dim())]
        return x.movedim(axis, 0).reshape(x.shape[axis], -1), shape
    return x.reshape(-1, group_size), [*x.shape[:-1], x.shape[-1] // group_size, 1]


def _safe_scale(scale: Tensor) -> Tensor:
    """An all-zero block gets scale 1 (its codes are exact zeros); no scale is so small that 1 / s overflows."""
    return torch.where(scale > 0, scale.clamp(min=torch.finfo(torch.float32).tiny), torch.ones_like(scale))


def _qparams_from_range(lo: Tensor, hi: Tensor, qmin: int, qmax: int, scheme: str) -> tuple[Tensor, Tensor | None]:
    """Scale and zero point mapping [lo, hi] (lo <= 0 <= hi) onto [qmin, qmax]; never a zero scale."""
    if scheme == "symmetric":
        return _safe_scale(torch.maximum(-lo, hi) / qmax), None
    scale = _safe_scale((hi - lo) / (qmax - qmin))
    zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)  # integer: 0.0 lands exactly on a code
    return scale, zero_point


def _quantile(rows: Tensor, q: float) -> Tensor:
    """Per-row q-quantile (linear interpolation, as torch.quantile, without its 16M-element limit)."""
    ordered = rows.sort(dim=1).values
    position = q * (rows.shape[1] - 1)
    below, frac = math.floor(position), position - math.floor(position)
    above = min(below + 1, rows.shape[1] - 1)
    return ordered[:, below] * (1 - frac) + ordered[:, above] * frac


def _codes(x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int) -> Tensor:
    """clamp(round(x * (1 / s)) + z): x times the float32 reciprocal of s, as torch.ao and fbgemm compute it,
    so that the codes equal theirs bit for bit (rounding half to even)."""
    codes = torch.round(x * scale.reciprocal())
    if zero_point is not None:
        codes = codes + zero_point
    return codes.clamp(qmin, qmax)


def _range(rows: Tensor, calibration: str, percentile: float) -> tuple[Tensor, Tensor]:
    """Per-row clipping range [lo, hi], widened to contain 0."""
    if calibration == "percentile":
        lo, hi = _quantile(rows, 1 - percentile / 100), _quantile(rows, percentile / 100)
    else:
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
    return lo.clamp(max=0), hi.clamp(min=0)


def choose_qparams(x: Tensor, bits: int = 8, scheme: str = "symmetric", granularity: str = "tensor", axis: int = 0,
                   group_size: int | None = None, calibration: str = "minmax",
                   percentile: float = 99.99) -> tuple[Tensor, Tensor | None]:
    """Scale and zero point of `x` (shapes as in `QTensor`). Calibration chooses the clipping range:
    "minmax" the whole range; "percentile" the `percentile`-th and (100 - `percentile`)-th percentiles;
    "mse" the range shrunk by the ratio in MSE_RATIOS that minimises ||x - x_hat||^2 per block (the grid
    search of GPTQ's quantizer, Frantar et al. 2022)."""
    qmin, qmax = quant_range(bits, scheme)
    _check_choice("calibration", calibration, CALIBRATIONS)
    if not 50 < percentile <= 100:
        raise ValueError(f"percentile must be in (50, 100], got {percentile!r}")
    _check_input(x, granularity, axis, group_size)
    rows, shape = _blocks(x.detach().float(), granularity, axis, group_size)  # (n_blocks, block_len)
    lo, hi = _range(rows, calibration, percentile)  # (n_blocks,) each
    scale, zero_point = _qparams_from_range(lo, hi, qmin, qmax, scheme)
    if calibration == "mse":
        best = torch.full_like(lo, float("inf"))
        for ratio in MSE_RATIOS.tolist():
            s, z = _qparams_from_range(lo * ratio, hi * ratio, qmin, qmax, scheme)
            z_col = None if z is None else z[:, None]
            x_hat = (_codes(rows, s[:, None], z_col, qmin, qmax) - (0 if z is None else z_col)) * s[:, None]
            error = (x_hat - rows).square().sum(dim=1)  # (n_blocks,)
            better = error < best
            best = torch.where(better, error, best)
            scale = torch.where(better, s, scale)
            zero_point = None if z is None else torch.where(better, z, zero_point)
    scale = scale.reshape(shape)
    return scale, None if zero_point is None else zero_point.reshape(shape).to(torch.int32)


def quantize(x: Tensor, bits: int = 8, scheme: str = "symmetric", granularity: str = "tensor", axis: int = 0,
             group_size: int | None = None, calibration: str = "minmax", percentile: float = 99.99) -> QTensor:
    """Quantize `x` to `bits`-bit integer codes; every value inside the clipping range comes back within s / 2.

    Args:
        x: any float tensor, e.g. an (out, in) weight; NaN and Inf are refused.
        bits: 2..8. scheme: "symmetric" | "asymmetric". granularity: "tensor" | "channel" | "group".
        axis: the channel axis (granularity "channel"). group_size: elements per group along the last dim.
        calibration: "minmax" | "percentile" | "mse" (see `choose_qparams`).
    """
    scale, zero_point = choose_qparams(x, bits, scheme, granularity, axis, group_size, calibration, percentile)
    qmin, qmax = quant_range(bits, scheme)
    blocked = _blocked_view(x.detach().float(), granularity, group_size)
    codes = _codes(blocked, scale, zero_point, qmin, qmax).reshape(x.shape)
    codes = codes.to(torch.int8 if scheme == "symmetric" else torch.uint8)
    axis = axis % x.dim() if granularity == "channel" else None
    return QTensor(codes, scale, zero_point, bits, scheme, granularity, axis,
                   group_size if granularity == "group" else None, x.shape)


def pack(codes: Tensor, bits: int) -> Tensor:
    """Unsigned codes in [0, 2^bits) -> uint8 bytes, 8 / bits codes per byte, the FIRST code in the HIGH bits
    (as bitsandbytes packs NF4). Flattened; an odd length is padded with zero codes."""
    if bits not in PACK_BITS:
        raise ValueError(f"pack handles bits in {PACK_BITS} (whole codes per byte), got {bits!r}")
    if not isinstance(codes, Tensor) or codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"pack takes an integer tensor of codes, got {getattr(codes, 'dtype', type(codes).__name__)}")
    flat = codes.flatten().to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"{bits}-bit codes must lie in [0, {2**bits}), got values in "
                         f"[{int(flat.min())}, {int(flat.max())}]; offset signed codes by -qmin first")
    per_byte = 8 // bits
    flat = F.pad(flat, (0, -flat.numel() % per_byte)).reshape(-1, per_byte)  # (n_bytes, per_byte)
    shifts = torch.arange(per_byte - 1, -1, -1, device=flat.device) * bits  # first code -> highest bits
    return (flat << shifts).sum(dim=1).to(torch.uint8)  # (n_bytes,)


def unpack(packed: Tensor, bits: int, numel: int) -> Tensor:
    """The inverse of `pack`: uint8 bytes -> the first `numel` codes, uint8, flattened."""
    if bits not in PACK_BITS:
        raise ValueError(f"unpack handles bits in {PACK_BITS} (whole codes per byte), got {bits!r}")
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"unpack takes the uint8 bytes pack returns, got {getattr(packed, 'dtype', type(packed))}")
    per_byte = 8 // bits
    if not 0 <= numel <= packed.numel() * per_byte:
        raise ValueError(f"numel {numel} does not fit in {packed.numel()} bytes of {bits}-bit codes")
    shifts = torch.arange(per_byte - 1, -1, -1, device=packed.device) * bits
    codes = (packed.flatten().to(torch.int64)[:, None] >> shifts) & (2**bits - 1)  # (n_bytes, per_byte)
    return codes.flatten()[:numel].to(torch.uint8)


class _FakeQuantizeFunction(torch.autograd.Function):
    """x_hat = (clamp(round(x / s) + z, qmin, qmax) - z) * s. Backward: the straight-through estimator for x
    (1 where the code was not clamped, 0 where it was), and, when s trains, LSQ's step-size gradient
    (Esser et al. 2020, eq. 3): d x_hat / d s = (q - z) - x / s inside the range, (qmin - z) or (qmax - z)
    outside, times the gradient scale g. torch.ao's fake-quant ops define the same gradients."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, grad_scale):
        codes = torch.round(x * scale.reciprocal()) + zero_point
        inside = (codes >= qmin) & (codes <= qmax)
        codes = codes.clamp(qmin, qmax)
        ctx.save_for_backward(x, scale, zero_point, codes, inside)
        ctx.grad_scale = grad_scale
        return (codes - zero_point) * scale

    @staticmethod
    def backward(ctx, grad):
        x, scale, zero_point, codes, inside = ctx.saved_tensors
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            d_scale = (codes - zero_point) - torch.where(inside, x / scale, 0.0)
            grad_scale = (grad * d_scale).sum_to_size(scale.shape) * ctx.grad_scale
        return grad_x, grad_scale, None, None, None, None


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int,
                  grad_scale: float = 1.0) -> Tensor:
    """Quantize and dequantize in one differentiable step (x_hat in x's dtype), for quantization-aware training.

    Args:
        x: any shape; scale, zero_point: broadcastable against x (zero_point None: 0).
        qmin, qmax: the integer grid (`quant_range`). grad_scale: LSQ's g, used only when `scale` requires grad.
    """
    scale = scale.to(x.dtype)
    zero_point = torch.zeros_like(scale) if zero_point is None else zero_point.to(x.dtype)
    return _FakeQuantizeFunction.apply(x, scale, zero_point, qmin, qmax, grad_scale)


class FakeQuantize(nn.Module):
    """Fake-quantizes a tensor in the forward pass. Without `learn_scale` the scale follows the tensor (recomputed
    from it at every call, no gradient: QAT with the STE, Jacob et al. 2018). With `learn_scale` the scale is a
    parameter that starts at the calibrated value of the tensor given to `init_scale` and trains with LSQ's
    gradient, scaled by g = 1 / sqrt(numel * qmax) (Esser et al. 2020, section 2.2)."""

    def __init__(self, bits: int = 8, scheme: str = "symmetric", granularity: str = "tensor", axis: int = 0,
                 group_size: int | None = None, calibration: str = "minmax", learn_scale: bool = False):
        super().__init__()
        self.qmin, self.qmax = quant_range(bits, scheme)
        _check_choice("granularity", granularity, GRANULARITIES)
        _check_choice("calibration", calibration, CALIBRATIONS)
        if learn_scale and scheme != "symmetric":
            raise ValueError(f"learn_scale trains LSQ's step size on a symmetric grid; got scheme {scheme!r}")
        self.bits, self.scheme, self.granularity, self.axis = bits, scheme, granularity, axis
        self.group_size, self.calibration, self.learn_scale = group_size, calibration, learn_scale
        self.register_parameter("scale", None)  # learn_scale: set by init_scale, from the tensor to quantize

    def qparams(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        return choose_qparams(x, self.bits, self.scheme, self.granularity, self.axis, self.group_size, self.calibration)

    @torch.no_grad()
    def init_scale(self, x: Tensor) -> None:
        """Start the learned scale at the calibrated scale of `x` (the tensor this quantizer will see)."""
        self.scale = nn.Parameter(self.qparams(x)[0].to(x.device))

    def forward(self, x: Tensor) -> Tensor:
        blocked = _blocked_view(x, self.granularity, self.group_size)
        if self.learn_scale:
            if self.scale is None:
                raise ValueError("this FakeQuantize learns its scale: call init_scale(tensor) before the first forward")
            g = 1.0 / math.sqrt(x.numel() * self.qmax)
            scale = self.scale.clamp(min=torch.finfo(torch.float32).tiny)  # a step trained through 0 stays valid
            return fake_quantize(blocked, scale, None, self.qmin, self.qmax, g).reshape(x.shape)
        scale, zero_point = self.qparams(x)
        return fake_quantize(blocked, scale, zero_point, self.qmin, self.qmax).reshape(x.shape)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.granularity == "group" else ""
        return (f"bits={self.bits}, scheme={self.scheme}, granularity={self.granularity}{group}, "
                f"calibration={self.calibration}, learn_scale={self.learn_scale}")


class QATLinear(nn.Linear):
    """An nn.Linear whose forward uses the fake-quantized weight: y = x fq(W)^T + b (as torch.ao.nn.qat.Linear).
    The float weight W keeps training; `weight_fake_quant` decides the grid."""

    def __init__(self, in_features: int, out_features: int, bias: bool, weight_fake_quant: FakeQuantize):
        super().__init__(in_features, out_features, bias)
        self.weight_fake_quant = weight_fake_quant

    @classmethod
    def from_linear(cls, layer: nn.Linear, weight_fake_quant: FakeQuantize) -> "QATLinear":
        """Wrap `layer`, sharing its weight and bias tensors."""
        qat = cls(layer.in_features, layer.out_features, layer.bias is not None, weight_fake_quant)
        qat.weight, qat.bias = layer.weight, layer.bias
        if weight_fake_quant.learn_scale:
            weight_fake_quant.init_scale(layer.weight)
        return qat.to(layer.weight.device)

    def quantized_weight(self) -> Tensor:
        return self.weight_fake_quant(self.weight)  # (out, in)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)  # (..., out)


class QATEmbedding(nn.Embedding):
    """An nn.Embedding that looks rows up in the fake-quantized table fq(E) (one scale per row with granularity
    "channel": per token). In a small classifier the table holds most of the weights."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None,
                 weight_fake_quant: FakeQuantize):
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.weight_fake_quant = weight_fake_quant

    @classmethod
    def from_embedding(cls, layer: nn.Embedding, weight_fake_quant: FakeQuantize) -> "QATEmbedding":
        """Wrap `layer`, sharing its table."""
        if layer.max_norm is not None or layer.sparse:
            raise ValueError("QAT embeddings support neither max_norm nor sparse gradients")
        qat = cls(layer.num_embeddings, layer.embedding_dim, layer.padding_idx, weight_fake_quant)
        qat.weight = layer.weight
        if weight_fake_quant.learn_scale:
            weight_fake_quant.init_scale(layer.weight)
        return qat.to(layer.weight.device)

    def quantized_weight(self) -> Tensor:
        return self.weight_fake_quant(self.weight)  # (V, C)

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.quantized_weight(), self.padding_idx)  # (..., C)


QAT_LAYERS = (QATLinear, QATEmbedding)


def apply_qat(model: nn.Module, bits: int = 4, scheme: str = "symmetric", granularity: str = "channel",
              group_size: int | None = None, calibration: str = "minmax", learn_scale: bool = False,
              skip: Iterable[str] = (), embeddings: bool = False) -> nn.Module:
    """Replace, in place, every nn.Linear (and nn.Embedding, with `embeddings`) that `skip` does not name by a
    QAT layer fake-quantizing its weight per tensor, per row (output channel / token: axis 0) or per group of
    `group_size` consecutive inputs; return the model. Training then updates float weights that the forward
    pass only sees on the grid (Jacob et al. 2018); `unload_qat` bakes the grid in.

    Args:
        skip: module names (or dotted prefixes of them) kept in floating point, e.g. ("head",).
        learn_scale: LSQ (Esser et al. 2020): each layer's scales become parameters, trained with the weights.
    """
    if qat_layers(model):
        raise ValueError("the model already has QAT layers: unload_qat it first")
    quantizer = dict(bits=bits, scheme=scheme, granularity=granularity, axis=0, group_size=group_size,
                     calibration=calibration, learn_scale=learn_scale)
    FakeQuantize(**quantizer)  # check the settings before changing anything
    kinds = (nn.Linear, nn.Embedding) if embeddings else (nn.Linear,)
    targets = select_layers(model, kinds, skip, "fake-quantize")
    for name, layer in targets:  # check every layer before changing any
        try:
            _check_input(layer.weight, granularity, 0, group_size)  # e.g. a group size that does not divide `in`
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
    for name, layer in targets:
        if isinstance(layer, nn.Linear):
            model.set_submodule(name, QATLinear.from_linear(layer, FakeQuantize(**quantizer)))
        else:
            model.set_submodule(name, QATEmbedding.from_embedding(layer, FakeQuantize(**quantizer)))
    return model


def qat_layers(model: nn.Module) -> dict[str, QATLinear | QATEmbedding]:
    """{module path: layer} of every QAT layer (QATLinear, QATEmbedding) in `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QAT_LAYERS)}


@torch.no_grad()
def unload_qat(model: nn.Module) -> nn.Module:
    """Put plain nn.Linear / nn.Embedding layers back, holding the quantized-then-dequantized weights fq(W):
    an ordinary model that computes what the QAT model computed, to evaluate, save or quantize for real."""
    layers = qat_layers(model)
    if not layers:
        raise ValueError("this model has no QAT layers; call apply_qat first")
    for name, layer in layers.items():
        factory = dict(device=layer.weight.device, dtype=layer.weight.dtype)
        if isinstance(layer, QATLinear):
            plain = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None, **factory)
            if layer.bias is not None:
                plain.bias.copy_(layer.bias)
        else:
            plain = nn.Embedding(layer.num_embeddings, layer.embedding_dim, layer.padding_idx, **factory)
        plain.weight.copy_(layer.quantized_weight())
        model.set_submodule(name, plain)
    return model

