"""Non-uniform codes: NormalFloat (NF4), bitsandbytes' FP4, power-of-two and k-means codebooks, double quantization.

    x_hat_i = absmax_b * table[q_i]        q_i = index of the table entry nearest to x_i / absmax_b

Blockwise absmax (Dettmers et al. 2022, arXiv 2110.02861): the flattened tensor is cut into blocks of `blocksize`
values, each scaled by its own absmax into [-1, 1] and coded against a sorted table of 16 values in [-1, 1].
NF4 (Dettmers et al. 2023, QLoRA, arXiv 2305.14314, sec. 3) puts the 16 values at quantiles of N(0, 1), so that
normally distributed weights use every code about equally often. Double quantization stores the fp32 absmax
constants themselves in 8 bits: 4 + 32/64 = 4.5 bits per weight become 4 + 8/64 + 32/(64*256) = 4.127.
Codes, packed bytes and dequantized values equal bitsandbytes' `quantize_4bit` / `dequantize_4bit` on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from tunelab.quant.kmeans import kmeans_1d
from tunelab.quant.uniform import check_bits, pack, unpack

NF4_OFFSET = 0.9677083  # = ((1 - 1/30) + (1 - 1/32)) / 2: the outermost quantile, so that the table stays finite
# bitsandbytes' NF4 table (functional.get_4bit_type("nf4")); `nf4_code()` derives it from normal quantiles.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])
# bitsandbytes' FP4, indexed by the 4-bit pattern (bit 3 = sign), divided by its largest magnitude 12.
FP4_CODE = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                         -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]) / 12
E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # OCP MX FP4 magnitudes (a sign bit doubles them)
QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' quantize_4bit accepts
ABSMAX_BLOCKSIZE = 256  # double quantization: blocks of the absmax constants (QLoRA, as bitsandbytes)
BNB_LOOKUP_POINTS = 65536  # bitsandbytes' CPU 8-bit kernel snaps scaled values to this grid before its table lookup
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def nf4_code(offset: float = NF4_OFFSET) -> Tensor:
    """The 16 NF4 values (QLoRA, sec. 3): normal quantiles at evenly spaced probabilities, scaled into [-1, 1].

    8 levels above zero at p = 0.5 ... offset (9 points, the median dropped), 7 below at 1 - p for 8 points, and an
    exact zero: 16 codes with zero representable cannot be symmetric, so the positive side gets the extra level.
    """
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])  # (8,) Phi^-1(p)
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])  # (7,)
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values  # (16,)
    return (levels / levels.max()).float()


def fp4_code() -> Tensor:
    """bitsandbytes' FP4 from its bits s e1 e0 m (index = pattern): e = 0 is subnormal, m / 16; e = 1, 2, 3 give
    2^(4 - e) * (1 + m / 2), i.e. {8, 12}, {4, 6}, {2, 3}; the sign bit negates; all divided by 12 (absmax 1)."""
    magnitudes = []
    for pattern in range(8):
        exponent, mantissa = pattern >> 1, pattern & 1
        magnitudes.append(mantissa / 16 if exponent == 0 else 2.0 ** (4 - exponent) * (1 + mantissa / 2))
    magnitudes = torch.tensor(magnitudes)  # (8,)
    return torch.cat([magnitudes, -magnitudes]) / 12


def dynamic_map(signed: bool = True) -> Tensor:
    """The 8-bit dynamic tree map (Dettmers 2016, arXiv 1511.04561), equal to bitsandbytes' `create_dynamic_map`.

    Level i = 0..6 holds 2^i (signed) or 2^(i+1) values 10^(i-6) * f, f the midpoints of a linspace(0.1, 1) grid:
    small magnitudes keep relative precision, as a float's exponent would. Plus 0 and 1; 256 values, sorted.
    """
    values = [0.0, 1.0]
    for level in range(7):
        n_fractions = 2 ** level if signed else 2 ** (level + 1)
        edges = torch.linspace(0.1, 1, n_fractions + 1)
        magnitudes = 10.0 ** (level - 6) * ((edges[:-1] + edges[1:]) / 2)  # (n_fractions,) float32
        values += magnitudes.tolist() + ((-magnitudes).tolist() if signed else [])
    return torch.tensor(sorted(values))


def _check_tensor(t: Tensor, dtypes: tuple | None = FLOAT_DTYPES) -> None:
    """Refuse what cannot be quantized: a non-tensor, a dtype outside `dtypes` (None: any float), empty, NaN/Inf."""
    if not isinstance(t, Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(t).__name__}")
    if (dtypes is not None and t.dtype not in dtypes) or not t.is_floating_point():
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes or FLOAT_DTYPES)
        raise TypeError(f"expected a float tensor ({allowed}), got dtype {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {tuple(t.shape)})")
    finite = torch.isfinite(t)
    if not finite.all():
        n_nan = int(torch.isnan(t).sum())
        raise ValueError(f"tensor has {n_nan} NaN and {int((~finite).sum()) - n_nan} Inf values; "
                         "quantize finite weights only")


def _check_blocksize(blocksize: int, allowed: tuple | None = None) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    if allowed is not None and blocksize not in allowed:
        raise ValueError(f"blocksize must be one of {allowed} (the block sizes bitsandbytes accepts), got {blocksize}")


def quantize_blockwise(t: Tensor, code: Tensor, blocksize: int,
                       lookup_points: int | None = None) -> tuple[Tensor, Tensor]:
    """Blockwise absmax coding against a sorted table: q = nearest entry of `code` to x / absmax_b (ties: lower).

    Args:
        t: any shape; blocks run over t.flatten() (row-major), a partial last block gets its own absmax.
        code: (k,) sorted ascending, k <= 256, values in [-1, 1].
        blocksize: values per block.
        lookup_points: None finds the exact nearest entry (bucketize against the midpoints, as bitsandbytes'
            PyTorch kernel, which multiplies full blocks by 1 / absmax and divides the last partial block).
            An int first rounds x / absmax to that many evenly spaced points of [-1, 1], as bitsandbytes' CPU
            8-bit kernel does with 65,536 (a lookup table instead of a search): within 1/65535 of a midpoint
            the farther neighbour can win.

    Returns:
        codes: uint8 in t's shape; absmax: float32 (ceil(n / blocksize),).
    """
    _check_tensor(t, dtypes=None)
    _check_blocksize(blocksize)
    flat = t.detach().reshape(-1).float()  # (n,)
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    blocks = torch.nn.functional.pad(flat, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)  # (nb, bs)
    absmax = blocks.abs().amax(dim=1)  # (nb,) zero padding never raises a block's absmax
    midpoints = (code[:-1] + code[1:]) / 2  # (k - 1,)
    if lookup_points is None:
        scaled = blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]  # (nb, bs)
        if n % blocksize:  # the partial last block is divided, which can differ from x * (1/a) in the last bit
            scaled[-1] = blocks[-1] / absmax[-1].clamp(min=1e-38)
        codes = torch.bucketize(scaled.clamp(-1, 1), midpoints)  # x == midpoint -> the lower code
    else:
        inverse = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
        scaled = (blocks * inverse[:, None]).clamp(-1, 1)
        point = (((scaled + 1) * 0.5) * (lookup_points - 1) + 0.5).long()  # (nb, bs) index of the nearest point
        grid = -1 + (2 * torch.arange(lookup_points, dtype=torch.float32)) / (lookup_points - 1)  # (points,)
        codes = torch.bucketize(grid.to(flat.device), midpoints)[point]
        codes[absmax == 0] = 0  # an all-zero block (bitsandbytes stores code 0; absmax 0 decodes it to 0)
    return codes.reshape(-1)[:n].to(torch.uint8).reshape(t.shape), absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, code: Tensor, blocksize: int,
                         dtype: torch.dtype = torch.float32) -> Tensor:
    """x_hat = code[q] * absmax_b in float32, then cast to `dtype`; the shape of `codes`."""
    values = code[codes.reshape(-1).long()]  # (n,) float32
    return _scale_blocks(values, absmax, blocksize, dtype).reshape(codes.shape)


def _scale_blocks(values: Tensor, absmax: Tensor, blocksize: int, dtype: torch.dtype) -> Tensor:
    """values (n,) float32, block b multiplied by absmax[b] (a partial last block too), cast to `dtype`."""
    n, n_blocks = values.numel(), absmax.numel()
    blocks = torch.nn.functional.pad(values, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    return (blocks * absmax[:, None]).reshape(-1)[:n].to(dtype)


def byte_pairs(table: Tensor) -> Tensor:
    """(256, 2): the two table values one packed byte stands for, its high nibble first. Decoding through it
    is one lookup per byte instead of unpacking the nibbles and looking each up (3x faster on a CPU)."""
    byte = torch.arange(256, device=table.device)
    return torch.stack([table[byte >> 4], table[byte & 15]], dim=1)


def nominal_bits_per_param(blocksize: int = 64, double_quant: bool = False) -> float:
    """4 bits per code plus the constants (QLoRA, sec. 3): 4 + 32/blocksize, or 4 + 8/blocksize + 32/(blocksize*256)."""
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * ABSMAX_BLOCKSIZE)
    return 4 + 32 / blocksize


@dataclass
class Quant4:
    """A 4-bit blockwise tensor: `packed` uint8 (ceil(n/2),) two codes per byte, the first in the high nibble,
    and either `absmax` float32 (n_blocks,) or, double-quantized, `absmax_codes` uint8 (n_blocks,) with
    `absmax_scales` float32 (ceil(n_blocks/256),) and `absmax_offset` a float32 0-dim tensor (their mean)."""

    packed: Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    absmax: Tensor | None = None
    absmax_codes: Tensor | None = None
    absmax_scales: Tensor | None = None
    absmax_offset: Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.absmax_codes is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def table(self) -> Tensor:
        """The 16 values the 4-bit codes index (NF4_CODE or FP4_CODE)."""
        return (NF4_CODE if self.quant_type == "nf4" else FP4_CODE).to(self.packed.device)

    def block_absmax(self) -> Tensor:
        """The absmax of each block (n_blocks,) float32: stored, or decoded from 8 bits plus the offset."""
        if not self.double_quant:
            return self.absmax
        centred = dequantize_blockwise(self.absmax_codes, self.absmax_scales, dynamic_map().to(self.packed.device),
                                       ABSMAX_BLOCKSIZE)
        return centred + self.absmax_offset

    def codes(self) -> Tensor:
        """The 4-bit code of every element, uint8, flattened (n,)."""
        return unpack(self.packed, 4, self.numel)

    def dequantize(self) -> Tensor:
        """table[q] * absmax_b in float32, cast to the input's dtype, in the input's shape (as bitsandbytes)."""
        values = torch.nn.functional.embedding(self.packed.int(), byte_pairs(self.table)).view(-1)  # (2 bytes,)
        return _scale_blocks(values[: self.numel], self.block_absmax(), self.blocksize, self.dtype).reshape(self.shape)

    @property
    def bits_per_param(self) -> float:
        """Stored bits per element: packed codes and constants as kept (`nominal_bits_per_param` is the formula)."""
        return sum(t.numel() * t.element_size() * 8 for t in self.tensors().values()) / self.numel

    def tensors(self) -> dict[str, Tensor]:
        """The stored tensors by name (module buffers, safetensors entries); `from_tensors` inverts it."""
        names = ("absmax_codes", "absmax_scales", "absmax_offset") if self.double_quant else ("absmax",)
        return {"packed": self.packed, **{name: getattr(self, name) for name in names}}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], shape, dtype: torch.dtype | str, blocksize: int,
                     quant_type: str) -> "Quant4":
        """Rebuild the Quant4 that `tensors()` came from; double quantization is read from the names present."""
        _check_blocksize(blocksize, BLOCKSIZES)
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
        dtype = getattr(torch, dtype.removeprefix("torch.")) if isinstance(dtype, str) else dtype
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")
        shape = torch.Size(shape)
        double = "absmax_codes" in tensors
        expected = {"packed", "absmax_codes", "absmax_scales", "absmax_offset"} if double else {"packed", "absmax"}
        if set(tensors) != expected:
            raise ValueError(f"expected tensors {sorted(expected)}, got {sorted(tensors)}")
        n_blocks = -(-math.prod(shape) // blocksize)
        sizes = {"packed": -(-math.prod(shape) // 2), "absmax": n_blocks, "absmax_codes": n_blocks,
                 "absmax_scales": -(-n_blocks // ABSMAX_BLOCKSIZE), "absmax_offset": 1}
        for name, tensor in tensors.items():
            if tensor.numel() != sizes[name]:
                raise ValueError(f"{name} has {tensor.numel()} elements; shape {tuple(shape)} with blocksize "
                                 f"{blocksize} needs {sizes[name]}")
        return cls(shape=shape, dtype=dtype, blocksize=blocksize, quant_type=quant_type,
                   **{name: t.reshape(()) if name == "absmax_offset" else t.reshape(-1) for name, t in tensors.items()})


def quantize_4bit(t: Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False) -> Quant4:
    """NF4 or FP4 blockwise quantization, equal to bitsandbytes.functional.quantize_4bit on the CPU.

    Args:
        t: float32 / float16 / bfloat16, any shape (e.g. an (out, in) weight); blocks run over t.flatten().
        quant_type: "nf4" | "fp4". blocksize: 32 ... 4096, a power of two (64 in QLoRA).
        double_quant: store the absmax constants minus their mean in 8 bits (the dynamic map), in blocks of 256.
    """
    _check_tensor(t)
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    _check_blocksize(blocksize, BLOCKSIZES)
    table = (NF4_CODE if quant_type == "nf4" else FP4_CODE).to(t.device)
    sorted_table, order = torch.sort(table, stable=True)  # FP4's +0 (pattern 0) sorts before its -0 (pattern 8)
    positions, absmax = quantize_blockwise(t, sorted_table, blocksize)
    codes = order[positions.reshape(-1).long()]  # (n,) position in the sorted table -> 4-bit pattern
    if codes.numel() % 2:  # the spare low nibble of the last byte holds the code of 0.0, as bitsandbytes packs it
        zero_position = quantize_blockwise(torch.zeros(1, device=t.device), sorted_table, 1)[0]
        codes = torch.cat([codes, order[zero_position.long()]])
    fields = dict(packed=pack(codes, 4), shape=t.shape, dtype=t.dtype, blocksize=blocksize, quant_type=quant_type)
    if not double_quant:
        return Quant4(absmax=absmax, **fields)
    offset = absmax.mean()  # the constants are all positive: centring them lets the signed 8-bit map fit them
    absmax_codes, absmax_scales = quantize_blockwise(absmax - offset, dynamic_map().to(t.device), ABSMAX_BLOCKSIZE,
                                                     lookup_points=BNB_LOOKUP_POINTS)
    return Quant4(absmax_codes=absmax_codes, absmax_scales=absmax_scales, absmax_offset=offset, **fields)


def quantize_nf4(t: Tensor, blocksize: int = 64, double_quant: bool = False) -> Quant4:
    """NormalFloat 4-bit (QLoRA): `quantize_4bit(t, "nf4", ...)`."""
    return quantize_4bit(t, "nf4", blocksize, double_quant)


def quantize_fp4(t: Tensor, blocksize: int = 64, double_quant: bool = False) -> Quant4:
    """bitsandbytes' 4-bit float (1 sign, 2 exponent, 1 mantissa bit): `quantize_4bit(t, "fp4", ...)`."""
    return quantize_4bit(t, "fp4", blocksize, double_quant)


@dataclass
class CodebookTensor:
    """A tensor coded by one table: `codebook` float32 (k,) sorted, `indices` uint8 (the input's shape)."""

    codebook: Tensor
    indices: Tensor
    shape: torch.Size

    def dequantize(self) -> Tensor:
        """codebook[indices], float32, in the input's shape."""
        return self.codebook[self.indices.long()].reshape(self.shape)

    @property
    def bits_per_param(self) -> float:
        """ceil(log2 k) bits per index plus the fp32 codebook spread over the elements."""
        n = math.prod(self.shape)
        return math.ceil(math.log2(max(self.codebook.numel(), 2))) + 32 * self.codebook.numel() / n


def log2_code(bits: int = 4) -> Tensor:
    """Sign + power-of-two magnitudes in [-1, 1] (Miyashita et al. 2016, arXiv 1603.01025): 0 and
    +-2^-j for j = 0 .. 2^(bits-1) - 2, i.e. 2^bits - 1 sorted values (+0 and -0 are one code)."""
    check_bits(bits)
    powers = 2.0 ** -torch.arange(2 ** (bits - 1) - 1, dtype=torch.float32)  # (2^(b-1) - 1,) 1, 1/2, 1/4, ...
    return torch.cat([-powers, torch.zeros(1), powers.flip(0)])


def quantize_log2(t: Tensor, bits: int = 4) -> CodebookTensor:
    """Power-of-two codes scaled by the tensor's absmax: x_hat = absmax * (+-2^-j or 0), the nearest in value
    (Miyashita et al. round log2|x| instead; the nearest value has the lower squared error). Multiplying by x_hat
    is a shift: what makes log codes cheap in hardware. Dense near zero, coarse near absmax."""
    _check_tensor(t, dtypes=None)
    check_bits(bits)
    absmax = t.detach().abs().max().float().clamp(min=1e-38)
    codebook = log2_code(bits).to(t.device) * absmax  # (2^bits - 1,)
    indices = torch.bucketize(t.detach().float(), (codebook[:-1] + codebook[1:]) / 2)  # ties -> lower
    return CodebookTensor(codebook, indices.to(torch.uint8), t.shape)


def quantize_kmeans(t: Tensor, bits: int = 4, init: str = "kmeans++", iters: int = 30,
                    generator: torch.Generator | None = None) -> CodebookTensor:
    """A k = 2^bits codebook fitted to the values by Lloyd's algorithm (1-D k-means, `kmeans_1d`): the table
    that minimises the squared error of this tensor, at the cost of storing it (Han et al. 2016, Deep Compression)."""
    _check_tensor(t, dtypes=None)
    check_bits(bits)
    centroids, assignments = kmeans_1d(t.detach(), 2 ** bits, init=init, iters=iters, generator=generator)
    return CodebookTensor(centroids, assignments.to(torch.uint8).reshape(t.shape), t.shape)
