"""Quantized linear and embedding layers, and `quantize_model`, which swaps them into any model.

Each layer stores integer codes (packed where they are narrower than a byte) and the constants to decode
them, and computes with them in one of two ways:

    weight-only (int8, int4, nf4, nf4-dq, fp4, kmeans):  y = x dequant(W)^T + b
        the codes are decoded to floats in the forward pass: less memory, and on a GPU less traffic;
        on a CPU the decoding is extra work.
    W8A8 (Dettmers et al. 2022; Xiao et al. 2023):       y = (s_x s_w) * (q_x q_w^T) + b
        the activations are quantized too, per token, at run time, and the product is an integer matmul
        with int32 accumulation (torch._int_mm), rescaled once per output.
    LLM.int8() (Dettmers et al. 2022, "LLM.int8()"):     the activation columns holding an |x| >= threshold
        (6.0) are multiplied in floating point and the rest in int8: a few outlier features would otherwise
        set every token's activation scale and erase the small values.

`quantize_model(model, method)` replaces every nn.Linear (and nn.Embedding, where the method has an embedding
form) that `skip` does not name, and returns a size report; `save_quantized` / `load_quantized` write and read
the codes with safetensors, so a quantized model reloads to identical logits without a pickle.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tunelab.core.io import read_safetensors, write_safetensors
from tunelab.quant.nonuniform import Quant4, quantize_4bit, quantize_kmeans, quantize_log2
from tunelab.quant.report import SizeReport, size_report
from tunelab.quant.select import select_layers
from tunelab.quant.uniform import pack, quant_range, quantize, unpack

INT8_MAX = 127  # symmetric int8 codes in [-127, 127], as LLM.int8() and bitsandbytes use
INT4_MIN = quant_range(4, "symmetric")[0]  # stored codes are code - INT4_MIN, in [0, 16)
CHUNK_ELEMENTS = 1 << 19  # W8A8 on a CPU: tokens per block x max(in, out) features, ~2 MB of float32
OUTLIER_THRESHOLD = 6.0  # LLM.int8()'s default: activation features with |x| >= 6 stay in floating point


def _int_mm_works() -> bool:
    """Whether this torch build has an int8 x int8 -> int32 matmul on the CPU (torch._int_mm)."""
    try:
        a = torch.ones(32, 32, dtype=torch.int8)
        return bool((torch._int_mm(a, a) == 32).all())
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


INT_MM = _int_mm_works()


def int8_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a (M, K) int8 @ b (K, N) int8 -> (M, N) int32, exact. torch._int_mm where it runs, else an exact fallback:
    int8 products summed in float64 are exact integers below 2^53 (each |a b| <= 2^14, so K < 2^39)."""
    if a.is_cuda:  # the CUDA kernel wants M > 16 and K, N multiples of 8
        if a.shape[0] > 16 and a.shape[1] % 8 == 0 and b.shape[1] % 8 == 0:
            return torch._int_mm(a, b)
    elif INT_MM:
        return torch._int_mm(a, b)
    return (a.double() @ b.double()).to(torch.int32)


def quantize_rows_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric absmax int8 codes per row: x (M, K) -> codes (M, K) int8, scales (M, 1) float32 with
    x ~ codes * scale. An all-zero row gets scale 1 (its codes are 0), so nothing divides by zero."""
    # max |x| = max(max x, -min x): two reductions, and no (M, K) |x| tensor to allocate
    absmax = torch.maximum(x.amax(dim=-1, keepdim=True), -x.amin(dim=-1, keepdim=True)).float()  # (M, 1)
    scale = torch.where(absmax > 0, absmax / INT8_MAX, torch.ones_like(absmax))  # (M, 1)
    # |x| <= absmax, so |x / scale| <= 127 up to the last ulp of the division, which rounding removes: no clamp
    codes = torch.div(x.float(), scale).round_().to(torch.int8)  # (M, K)
    return codes, scale


COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _float_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype) and name in COMPUTE_DTYPES.values():
        return name
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {sorted(COMPUTE_DTYPES)} or None, got {name!r}")
    return COMPUTE_DTYPES[name]


def _check_linear(layer: nn.Module) -> None:
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"expected an nn.Linear, got {type(layer).__name__}")


def autocast_enabled(x: Tensor) -> bool:
    """Whether autocast is on for x's device (torch < 2.4 asks per device by name)."""
    try:
        return torch.is_autocast_enabled(x.device.type)
    except TypeError:
        return torch.is_autocast_cpu_enabled() if x.device.type == "cpu" else torch.is_autocast_enabled()


class DequantizedMatmul(torch.autograd.Function):
    """y = x W^T with W decoded from `layer`'s codes, keeping nothing of W for the backward pass: the gradient
    with respect to x decodes W once more (dL/dx = dL/dy W). A frozen 4-bit layer then holds 4 bits per weight
    between the forward and the backward pass, not a float copy (QLoRA's trade, as bitsandbytes' MatMul4Bit).
    W is frozen: it gets no gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: "QuantLinear") -> Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize_weight().to(x.dtype))  # (..., out)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad @ ctx.layer.dequantize_weight().to(grad.dtype), None  # (..., in)


class QuantLinear(nn.Module):
    """What every quantized linear layer shares: in/out features, the float bias, and the interface the rest of
    TuneLab uses (`dequantize_weight`, `size_info`, `from_linear`, `empty`). The codes are buffers: nothing of a
    quantized layer trains but, if asked, its bias."""

    method = ""
    compute_dtype: torch.dtype | None = None  # the dtype of the matmul (None: the input's), as bitsandbytes'

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, layer: nn.Linear, **options) -> "QuantLinear":
        raise NotImplementedError

    def dequantize_weight(self) -> Tensor:
        """The float (out, in) weight the codes stand for."""
        raise NotImplementedError

    def options(self) -> dict:
        """The settings that rebuild an empty layer of the same layout (saved with the model)."""
        return {}

    @property
    def weight(self) -> Tensor:
        """The decoded float (out, in) weight, a new tensor on every read (DoRA's norms and merging read it)."""
        return self.dequantize_weight()

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out): weight-only layers decode W in the compute dtype and run a float matmul,
        without keeping the decoded W for the backward pass (`DequantizedMatmul`). The output is in x's dtype,
        or, under autocast, in the autocast dtype, as nn.Linear's is (so what follows keeps bf16 activations)."""
        dtype = self.compute_dtype or x.dtype
        y = DequantizedMatmul.apply(x.to(dtype), self)  # (..., out)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y if autocast_enabled(x) else y.to(x.dtype)

    def size_info(self) -> dict:
        stored = sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))
        bias = 0 if self.bias is None else self.bias.numel()
        weight = self.dequantize_weight()
        return {"params": self.in_features * self.out_features + bias, "bytes": stored + 4 * bias,
                "nonzeros": int(weight.count_nonzero()) + (0 if self.bias is None else int(self.bias.count_nonzero()))}

    def _copy_bias(self, layer: nn.Linear) -> None:
        if self.bias is not None:
            self.bias.data.copy_(layer.bias.detach().float())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, method={self.method!r}"


class Int8Linear(QuantLinear):
    """int8 weight-only: per-output-channel symmetric codes, W ~ codes * scale[:, None] (4x smaller than fp32).
    The forward multiplies x by the codes and scales the outputs: x (codes s)^T = (x codes^T) s."""

    method = "int8"

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.int8))  # (out, in)
        self.register_buffer("scale", torch.ones(out_features))  # (out,)

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> "Int8Linear":
        _check_linear(layer)
        q = cls(layer.in_features, layer.out_features, layer.bias is not None)
        codes, scale = quantize_rows_int8(layer.weight.detach())
        q.codes.copy_(codes)
        q.scale.copy_(scale.squeeze(1))
        q._copy_bias(layer)
        return q

    def dequantize_weight(self) -> Tensor:
        return self.codes.float() * self.scale[:, None]  # (out, in)

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.codes.to(x.dtype))  # (..., out), in the autocast dtype under autocast
        y = y * self.scale.to(y.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class _LastInput:
    """The last input a W8A8 layer quantized, with its codes. A transformer's q, k and v projections read the
    very same tensor, so the second and third find it here and skip the five passes of quantizing it again
    (what fusing the three projections into one matmul would save). Holding the tensor keeps its memory from
    being reused, and its version counter changes with any in-place write, so a match is always the same data."""

    def __init__(self):
        self.tensor, self.version, self.rows, self.blocks = None, -1, 0, []

    def get(self, x: Tensor, rows: int) -> list[tuple[Tensor, Tensor]] | None:
        if x is self.tensor and x._version == self.version and rows == self.rows:
            return self.blocks
        return None

    def put(self, x: Tensor, rows: int, blocks: list[tuple[Tensor, Tensor]]) -> None:
        self.tensor, self.version, self.rows, self.blocks = x, x._version, rows, blocks


_LAST_INPUT = _LastInput()


class W8A8Linear(QuantLinear):
    """Dynamic W8A8: per-channel int8 weights, per-token int8 activations computed at run time, an int8 matmul
    with int32 accumulation, one float rescale: y = (q_x q_w^T) * s_x s_w^T + b.

    With `threshold` (LLM.int8()), the input columns that hold any |x| >= threshold are taken out of the int8
    product and multiplied in floating point with the dequantized weight columns.

    Inference only, like torch.ao's dynamic quantization: rounding has no gradient, so the forward runs
    without autograd (quantization-aware training is `tunelab.quant.uniform.apply_qat`)."""

    method = "w8a8"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, threshold: float | None = None):
        super().__init__(in_features, out_features, bias)
        if threshold is not None and not threshold > 0:
            raise ValueError(f"the outlier threshold must be positive (or None for none), got {threshold}")
        self.threshold = threshold
        self.register_buffer("codes_t", torch.zeros(in_features, out_features, dtype=torch.int8))  # (in, out)
        self.register_buffer("scale", torch.ones(out_features))  # (out,)

    @classmethod
    def from_linear(cls, layer: nn.Linear, threshold: float | None = None) -> "W8A8Linear":
        _check_linear(layer)
        q = cls(layer.in_features, layer.out_features, layer.bias is not None, threshold)
        codes, scale = quantize_rows_int8(layer.weight.detach())
        q.codes_t.copy_(codes.t())  # stored (in, out): the contiguous right operand _int_mm is fastest with
        q.scale.copy_(scale.squeeze(1))
        q._copy_bias(layer)
        return q

    def options(self) -> dict:
        return {"threshold": self.threshold}

    def dequantize_weight(self) -> Tensor:
        return self.codes_t.t().float() * self.scale[:, None]  # (out, in)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()  # (M, in): tokens as rows
        outliers = None
        if self.threshold is not None:
            columns = (x2.abs() >= self.threshold).any(dim=0)  # (in,) features with an outlier in any token
            if columns.any():
                outliers = columns.nonzero().squeeze(1)
                x_outliers = x2[:, outliers]  # (M, n_outliers), kept in floating point
                x2 = x2.index_fill(1, outliers, 0.0)
        y = torch.empty(x2.shape[0], self.out_features, device=x.device)  # (M, out) float32
        # On a CPU, a block of tokens at a time: quantizing the block, its int32 product and the rescale then stay
        # in cache, where one pass over all M tokens would stream each (M, out) intermediate through memory.
        rows = x2.shape[0] if x.is_cuda else max(1, CHUNK_ELEMENTS // max(self.in_features, self.out_features))
        blocks = _LAST_INPUT.get(x, rows) if outliers is None else None
        if blocks is None:
            blocks = [quantize_rows_int8(x2[start:start + rows]) for start in range(0, x2.shape[0], rows)]
            if outliers is None:
                _LAST_INPUT.put(x, rows, blocks)
        for start, (codes, x_scale) in zip(range(0, x2.shape[0], rows), blocks):  # (m, in) int8, (m, 1)
            block = slice(start, start + rows)
            out = y[block]
            out.copy_(int8_matmul(codes, self.codes_t))  # (m, out): the exact int32 dot products, as float32
            out.mul_(x_scale)  # the token scales (a plain float pass: faster than a mixed int32 x float mul)
            if self.bias is not None:  # then the channel scales and the bias
                torch.addcmul(self.bias, out, self.scale, out=out)
            else:
                out.mul_(self.scale)
        if outliers is not None:
            w_outliers = self.codes_t[outliers].float() * self.scale  # (n_outliers, out)
            y.addmm_(x_outliers, w_outliers)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", threshold={self.threshold}" if self.threshold is not None else "")


class Int4Linear(QuantLinear):
    """int4 group-wise weight-only: symmetric codes per group of `group_size` inputs, two codes per byte."""

    method = "int4"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 64):
        super().__init__(in_features, out_features, bias)
        if in_features % group_size:
            raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
        self.group_size = group_size
        self.register_buffer("packed", torch.zeros(math.ceil(in_features * out_features / 2), dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, in_features // group_size))  # (out, groups)

    @classmethod
    def from_linear(cls, layer: nn.Linear, group_size: int = 64) -> "Int4Linear":
        """A layer narrower than `group_size` gets one group per row (per-channel scales)."""
        _check_linear(layer)
        group_size = min(group_size, layer.in_features)
        q = cls(layer.in_features, layer.out_features, layer.bias is not None, group_size)
        qt = quantize(layer.weight.detach().float(), bits=4, scheme="symmetric", granularity="group",
                      group_size=group_size)
        q.packed.copy_(pack((qt.codes.to(torch.int16) - INT4_MIN).to(torch.uint8).flatten(), 4))
        q.scale.copy_(qt.scale.reshape(layer.out_features, -1))
        q._copy_bias(layer)
        return q

    def options(self) -> dict:
        return {"group_size": self.group_size}

    def dequantize_weight(self) -> Tensor:
        n = self.in_features * self.out_features
        codes = unpack(self.packed, 4, n).to(torch.int16) + INT4_MIN  # undo the offset `from_linear` added
        groups = codes.reshape(self.out_features, -1, self.group_size).float()  # (out, groups, group_size)
        return (groups * self.scale[..., None]).reshape(self.out_features, self.in_features)


class Linear4bit(QuantLinear):
    """NF4 or FP4 weight-only, blockwise absmax over the flattened weight, optionally with double-quantized
    constants (Dettmers et al. 2023, QLoRA): the tensors of a `Quant4`, kept as buffers."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, quant_type: str = "nf4",
                 blocksize: int = 64, double_quant: bool = False, compute_dtype: str | None = None):
        super().__init__(in_features, out_features, bias)
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, double_quant
        self.compute_dtype = _float_dtype(compute_dtype)
        template = quantize_4bit(torch.zeros(out_features, in_features), quant_type, blocksize, double_quant)
        for name, tensor in template.tensors().items():
            self.register_buffer(name, torch.zeros_like(tensor))

    @property
    def method(self) -> str:
        return self.quant_type + ("-dq" if self.double_quant else "")

    @classmethod
    def from_linear(cls, layer: nn.Linear, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = False, compute_dtype: str | None = None) -> "Linear4bit":
        """compute_dtype: "float32", "bfloat16" or "float16" for the matmul; None: the input's dtype."""
        _check_linear(layer)
        q = cls(layer.in_features, layer.out_features, layer.bias is not None, quant_type, blocksize, double_quant,
                compute_dtype)
        for name, tensor in quantize_4bit(layer.weight.detach().float(), quant_type, blocksize,
                                          double_quant).tensors().items():
            getattr(q, name).copy_(tensor)
        q._copy_bias(layer)
        return q

    def options(self) -> dict:
        dtype = None if self.compute_dtype is None else str(self.compute_dtype).removeprefix("torch.")
        return {"quant_type": self.quant_type, "blocksize": self.blocksize, "double_quant": self.double_quant,
                "compute_dtype": dtype}

    def quant4(self) -> Quant4:
        tensors = {name: b for name, b in self.named_buffers(recurse=False)}
        return Quant4.from_tensors(tensors, (self.out_features, self.in_features), torch.float32, self.blocksize,
                                   self.quant_type)

    def dequantize_weight(self) -> Tensor:
        return self.quant4().dequantize()


class CodebookLinear(QuantLinear):
    """A per-layer codebook of 2^bits floats (k-means or log2 codes) and one packed index per weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4, kind: str = "kmeans"):
        super().__init__(in_features, out_features, bias)
        if bits not in (2, 4, 8):
            raise ValueError(f"codebook indices pack at 2, 4 or 8 bits, got bits={bits}")
        self.bits, self.kind = bits, kind
        self.register_buffer("codebook", torch.zeros(2 ** bits))
        self.register_buffer("packed", torch.zeros(math.ceil(in_features * out_features * bits / 8),
                                                   dtype=torch.uint8))

    @property
    def method(self) -> str:
        return self.kind

    @classmethod
    def from_linear(cls, layer: nn.Linear, bits: int = 4, kind: str = "kmeans") -> "CodebookLinear":
        _check_linear(layer)
        q = cls(layer.in_features, layer.out_features, layer.bias is not None, bits, kind)
        fit = {"kmeans": quantize_kmeans, "log2": quantize_log2}[kind]
        coded = fit(layer.weight.detach().float(), bits=bits)
        q.codebook.zero_()
        q.codebook[: coded.codebook.numel()] = coded.codebook
        q.packed.copy_(pack(coded.indices.flatten().to(torch.uint8), bits))
        q._copy_bias(layer)
        return q

    def options(self) -> dict:
        return {"bits": self.bits, "kind": self.kind}

    def dequantize_weight(self) -> Tensor:
        indices = unpack(self.packed, self.bits, self.in_features * self.out_features).long()
        return self.codebook[indices].reshape(self.out_features, self.in_features)


class QuantEmbedding(nn.Module):
    """An embedding table stored like a quantized linear weight (V rows of C): `store` holds the codes, and the
    forward decodes the table (or, for int8, only the looked-up rows)."""

    def __init__(self, store: QuantLinear, padding_idx: int | None = None):
        super().__init__()
        self.store, self.padding_idx = store, padding_idx
        self.num_embeddings, self.embedding_dim = store.out_features, store.in_features

    @property
    def method(self) -> str:
        return self.store.method

    @property
    def weight(self) -> Tensor:
        """The decoded (V, C) table (read-only use: e.g. a tied output projection)."""
        return self.store.dequantize_weight()

    def forward(self, ids: Tensor) -> Tensor:
        if isinstance(self.store, Int8Linear):  # int8 rows decode independently: gather, then scale
            return self.store.codes[ids].float() * self.store.scale[ids, None]  # (..., C)
        return F.embedding(ids, self.store.dequantize_weight())  # (..., C)

    def size_info(self) -> dict:
        return self.store.size_info()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, method={self.method!r}"


def quantize_embedding(module: nn.Embedding, store: type[QuantLinear], **options) -> QuantEmbedding:
    """An embedding table (V, C) stored as the weight of a quantized linear layer of class `store`."""
    table = nn.Linear(module.embedding_dim, module.num_embeddings, bias=False, device="meta")
    table.weight = module.weight
    return QuantEmbedding(store.from_linear(table, **options), module.padding_idx).to(module.weight.device)


@dataclass(frozen=True)
class QuantMethod:
    """One way to quantize a model: the linear layer class and its options, and the class storing embeddings
    (None: embeddings stay in floating point)."""

    name: str
    summary: str
    linear: type[QuantLinear]
    options: dict
    embedding: type[QuantLinear] | None


QUANT_METHODS = {m.name: m for m in [
    QuantMethod("int8", "int8 weights per output channel, float activations", Int8Linear, {}, Int8Linear),
    QuantMethod("w8a8", "int8 weights and per-token int8 activations, int32 matmul", W8A8Linear, {}, Int8Linear),
    QuantMethod("llm-int8", "w8a8 with LLM.int8()'s floating-point outlier columns (|x| >= 6)", W8A8Linear,
                {"threshold": OUTLIER_THRESHOLD}, Int8Linear),
    QuantMethod("int4", "int4 weights, symmetric per group of 64 inputs", Int4Linear, {"group_size": 64}, Int4Linear),
    QuantMethod("nf4", "NF4 weights, absmax per block of 64 (QLoRA)", Linear4bit,
                {"quant_type": "nf4", "blocksize": 64}, Linear4bit),
    QuantMethod("nf4-dq", "NF4 with double-quantized block constants (4.127 bits)", Linear4bit,
                {"quant_type": "nf4", "blocksize": 64, "double_quant": True}, Linear4bit),
    QuantMethod("fp4", "bitsandbytes' FP4 weights, absmax per block of 64", Linear4bit,
                {"quant_type": "fp4", "blocksize": 64}, Linear4bit),
    QuantMethod("kmeans", "a k-means codebook of 16 values per layer", CodebookLinear, {"bits": 4, "kind": "kmeans"},
                CodebookLinear),
    QuantMethod("log2", "power-of-two codes (sign + exponent) per layer", CodebookLinear, {"bits": 4, "kind": "log2"},
                CodebookLinear),
]}

_LAYER_CLASSES = {cls.__name__: cls for cls in (Int8Linear, W8A8Linear, Int4Linear, Linear4bit, CodebookLinear)}


def quantize_model(model: nn.Module, method: str, skip: Iterable[str] = (), embeddings: bool = True,
                   **options) -> SizeReport:
    """Replace, in place, every nn.Linear (and nn.Embedding when `embeddings` and the method has an embedding
    form) that `skip` does not name by the method's quantized layer; return the model's size report.

    Args:
        model: any model; its float weights are read once.
        method: a key of QUANT_METHODS ("int8", "w8a8", "llm-int8", "int4", "nf4", "nf4-dq", "fp4", "kmeans", "log2").
        skip: module names (or prefixes of them) to keep in floating point, e.g. ["classifier"].
        options: override the method's options (group_size=128, blocksize=128, threshold=4.0, bits=2 ...).
    """
    if method not in QUANT_METHODS:
        raise ValueError(f"unknown quantization method {method!r}; expected one of {sorted(QUANT_METHODS)}")
    spec = QUANT_METHODS[method]
    settings = {**spec.options, **options}
    kinds = (nn.Linear, nn.Embedding) if embeddings and spec.embedding is not None else (nn.Linear,)
    swaps = []
    for name, module in select_layers(model, kinds, skip, "quantize"):
        if isinstance(module, nn.Linear):
            swaps.append((name, spec.linear.from_linear(module, **settings)))
        else:
            store_options = settings if spec.embedding is spec.linear else {}
            swaps.append((name, quantize_embedding(module, spec.embedding, **store_options)))
    for name, layer in swaps:
        model.set_submodule(name, layer)
    return size_report(model)



def quantized_layout(model: nn.Module) -> dict[str, dict]:
    """What rebuilds the quantized layers of `model` empty: per module name, its class, sizes and options."""
    layout = {}
    for name, module in model.named_modules():
        store = module.store if isinstance(module, QuantEmbedding) else module
        if isinstance(store, QuantLinear) and not name.endswith(".store"):
            layout[name] = {"class": type(store).__name__, "in_features": store.in_features,
                            "out_features": store.out_features, "bias": store.bias is not None,
                            "embedding": isinstance(module, QuantEmbedding), **store.options()}
            if isinstance(module, QuantEmbedding):
                layout[name]["padding_idx"] = module.padding_idx
    return layout


LAYOUT_KEY = "tunelab.quant.layout"


def save_quantized(model: nn.Module, file: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write a quantized model's state (packed codes, scales, float tensors) to one safetensors file, with the
    layout of its quantized layers in the header so `load_quantized` can rebuild them."""
    write_safetensors(file, model.state_dict(), {**(metadata or {}), LAYOUT_KEY: json.dumps(quantized_layout(model))})


def load_quantized(model: nn.Module, file: str | Path) -> nn.Module:
    """Turn a float model of the saved architecture into the saved quantized model: swap in empty quantized
    layers as the file's layout says, then load every tensor (strict: a missing or unexpected name is an error)."""
    tensors, metadata = read_safetensors(file, with_metadata=True)
    if LAYOUT_KEY not in (metadata or {}):
        raise ValueError(f"{file} holds no quantized-layer layout ({LAYOUT_KEY!r} is missing from its header): "
                         "it was not written by save_quantized")
    rebuild_quantized(model, json.loads(metadata[LAYOUT_KEY]))
    model.load_state_dict(tensors, strict=True)
    return model


def rebuild_quantized(model: nn.Module, layout: dict[str, dict]) -> nn.Module:
    """Swap empty quantized layers into `model` where `layout` (from `quantized_layout`) says, ready for
    load_state_dict: no weight is quantized, so rebuilding is instant."""
    for name, entry in layout.items():
        entry = dict(entry)
        cls = _LAYER_CLASSES.get(entry.pop("class"))
        if cls is None:
            raise ValueError(f"module {name!r} has an unknown quantized layer class in the saved layout")
        is_embedding, padding_idx = entry.pop("embedding"), entry.pop("padding_idx", None)
        layer = cls(entry.pop("in_features"), entry.pop("out_features"), entry.pop("bias"), **entry)
        model.set_submodule(name, QuantEmbedding(layer, padding_idx) if is_embedding else layer)
    return model
