"""Quantized linear layers against the float layer, torch.ao and each other; quantize_model; save/load."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import assert_close
from tunelab.core.bert import BertConfig, BertForSequenceClassification
from tunelab.quant import linear as linear_module
from tunelab.quant.linear import (QUANT_METHODS, CodebookLinear, Int4Linear, Int8Linear, Linear4bit, QuantEmbedding,
                                  W8A8Linear, int8_matmul, load_quantized, quantize_model, quantize_rows_int8,
                                  save_quantized)
from tunelab.quant.nonuniform import quantize_4bit
from tunelab.quant.uniform import quantize


def linear(in_features=128, out_features=48, bias=True):
    layer = nn.Linear(in_features, out_features, bias=bias)
    nn.init.normal_(layer.weight, std=0.05)
    return layer


def test_int8_matmul_is_exact():
    a = torch.randint(-127, 128, (33, 70), dtype=torch.int8)
    b = torch.randint(-127, 128, (70, 19), dtype=torch.int8)
    assert torch.equal(int8_matmul(a, b), (a.long() @ b.long()).int())


def test_quantize_rows_int8_error_and_zero_rows():
    x = torch.randn(6, 40)
    x[2] = 0.0
    codes, scale = quantize_rows_int8(x)
    assert codes.dtype == torch.int8 and codes.abs().max() <= 127
    assert scale[2] == 1.0 and (codes[2] == 0).all()  # no division by zero
    assert ((codes.float() * scale - x).abs() <= scale / 2 + 1e-7).all()


def test_int8_weight_only_error_bound():
    layer = linear()
    q = Int8Linear.from_linear(layer)
    w_error = (q.dequantize_weight() - layer.weight).abs()
    assert (w_error <= q.scale[:, None] / 2 + 1e-8).all()  # round to nearest: at most half a step
    x = torch.randn(5, 128)
    # |x (W - W_q)^T|_j <= sum_i |x_i| * scale_j / 2
    bound = x.abs().sum(1, keepdim=True) * q.scale / 2
    assert ((q(x) - layer(x)).abs() <= bound + 1e-5).all()
    assert_close(q(x), F.linear(x, q.dequantize_weight(), layer.bias))


@pytest.mark.parametrize("tokens", [14, 700])  # 700 tokens: three blocks of at most 256, the last one partial
def test_w8a8_is_the_integer_product_rescaled(tokens, monkeypatch):
    monkeypatch.setattr(linear_module, "CHUNK_ELEMENTS", 256 * 128)  # blocks of 256 tokens for in=128
    layer = linear()
    q = W8A8Linear.from_linear(layer)
    x = torch.randn(2, tokens // 2, 128)
    codes, x_scale = quantize_rows_int8(x.reshape(-1, 128))
    exact = (codes.double() @ q.codes_t.double()) * x_scale.double() * q.scale.double() + layer.bias.double()
    assert_close(q(x), exact.float().reshape(2, tokens // 2, 48))
    assert q(x).shape == (2, tokens // 2, 48)


def test_w8a8_layers_reading_the_same_input_quantize_it_once_and_never_reuse_stale_codes(monkeypatch):
    q, k = W8A8Linear.from_linear(linear(128, 48)), W8A8Linear.from_linear(linear(128, 48))
    x = torch.randn(3, 5, 128)
    alone = [q(x.clone()), k(x.clone())]  # fresh tensors: each quantized by its own layer
    calls = []
    original = linear_module.quantize_rows_int8
    monkeypatch.setattr(linear_module, "quantize_rows_int8", lambda t: calls.append(1) or original(t))
    assert torch.equal(q(x), alone[0]) and torch.equal(k(x), alone[1])
    assert len(calls) == 1  # k found q's codes of the very same tensor
    x.mul_(2.0)  # an in-place change: the kept codes no longer describe x
    after = k(x)
    assert len(calls) == 2
    assert torch.equal(after, k(x.clone())) and not torch.equal(after, alone[1])


def test_w8a8_beats_torch_ao_dynamic_int8_on_the_same_layer():
    """torch.ao's dynamic int8 quantizes activations per tensor; ours per token (and weights per channel)."""
    layer = linear(256, 64)
    x = torch.randn(32, 256) * torch.linspace(0.1, 3.0, 32)[:, None]  # tokens of very different scales
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = torch.ao.quantization.quantize_dynamic(nn.Sequential(layer), {nn.Linear}, dtype=torch.qint8)
        ao_error = (reference(x) - layer(x)).abs().max()
    ours = W8A8Linear.from_linear(layer)
    our_error = (ours(x) - layer(x)).abs().max()
    assert our_error < ao_error
    assert our_error < 0.02 * layer(x).abs().max()


def test_llm_int8_outlier_columns_rescue_planted_outliers():
    """Two input features that reach 60 (LLM.int8()'s emergent outliers) set every token's int8 scale; taking
    those columns out in floating point restores the small features."""
    layer = linear(256, 64)
    x = torch.randn(16, 256)
    x[:, [3, 100]] = 60.0 * torch.sign(torch.randn(16, 2))
    plain = W8A8Linear.from_linear(layer)
    decomposed = W8A8Linear.from_linear(layer, threshold=6.0)
    reference = layer(x)
    plain_error = (plain(x) - reference).abs().mean()  # 0.086
    decomposed_error = (decomposed(x) - reference).abs().mean()  # 0.024
    weight_only_error = (Int8Linear.from_linear(layer)(x) - reference).abs().mean()  # 0.023: float activations
    assert decomposed_error < plain_error / 3
    assert decomposed_error < 1.1 * weight_only_error  # what is left is the weights' own rounding
    # without outliers the decomposition changes nothing
    y = torch.randn(4, 256)
    assert torch.equal(plain(y), decomposed(y))


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", False), ("nf4", True), ("fp4", False)])
def test_linear4bit_equals_its_quantized_weight(quant_type, double_quant):
    layer = linear(96, 40)
    q = Linear4bit.from_linear(layer, quant_type=quant_type, double_quant=double_quant)
    expected = quantize_4bit(layer.weight.detach(), quant_type, 64, double_quant).dequantize()
    assert torch.equal(q.dequantize_weight(), expected)
    x = torch.randn(3, 96)
    assert_close(q(x), F.linear(x, expected, layer.bias))
    assert q.method == quant_type + ("-dq" if double_quant else "")


@pytest.mark.parametrize("make", [lambda l: Linear4bit.from_linear(l, double_quant=True),
                                  lambda l: Linear4bit.from_linear(l, compute_dtype="float32"),
                                  Int8Linear.from_linear], ids=["nf4-dq", "nf4-fp32-compute", "int8"])
def test_weight_only_layers_follow_autocast_as_nn_linear_does(make):
    """Under bf16 autocast a quantized layer answers in bf16, as nn.Linear does, so the activations after it
    stay in bf16; outside autocast it answers in its input's dtype. Its bf16 output is its own fp32 output
    rounded, and gradients still reach the input."""
    layer = linear(96, 40)
    q = make(layer)
    x = torch.randn(3, 96, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_dtype, y = layer(x).dtype, q(x)
    assert y.dtype == expected_dtype == torch.bfloat16
    assert q(x).dtype == torch.float32
    assert_close(y.float(), q(x), atol=0.05, rtol=0.02)
    y.float().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_int4_group_wise_equals_uniform_group_quantization():
    layer = linear(128, 40)
    q = Int4Linear.from_linear(layer, group_size=32)
    expected = quantize(layer.weight.detach(), bits=4, scheme="symmetric", granularity="group",
                        group_size=32).dequantize()
    assert_close(q.dequantize_weight(), expected)
    assert q.packed.dtype == torch.uint8 and q.packed.numel() == 128 * 40 // 2  # two codes per byte


def test_codebook_linear_has_at_most_k_values():
    layer = linear(64, 32)
    for kind in ("kmeans", "log2"):
        q = CodebookLinear.from_linear(layer, bits=4, kind=kind)
        assert q.dequantize_weight().unique().numel() <= 16
    kmeans = CodebookLinear.from_linear(layer, bits=4, kind="kmeans").dequantize_weight()
    int4 = quantize(layer.weight.detach(), bits=4).dequantize()  # one scale for the layer, like the codebook
    assert (kmeans - layer.weight).pow(2).mean() < (int4 - layer.weight).pow(2).mean()


def tiny_classifier():
    model = BertForSequenceClassification(BertConfig.tiny(hidden_size=64, intermediate_size=128)).eval()
    ids = torch.randint(1, 99, (3, 12))
    return model, ids


@pytest.mark.parametrize("method", sorted(QUANT_METHODS))
def test_quantize_model_swaps_layers_and_round_trips_through_safetensors(method, tmp_path):
    model, ids = tiny_classifier()
    reference = model(ids)
    report = quantize_model(model, method, skip=["classifier"])
    assert isinstance(model.classifier, nn.Linear)
    assert not any(type(m) is nn.Linear for name, m in model.named_modules() if name != "classifier")
    assert isinstance(model.bert.embeddings.word_embeddings, QuantEmbedding)
    logits = model(ids)
    assert (logits - reference).abs().max() < 0.5 * reference.abs().max() + 0.05  # a loose sanity bound
    assert report.ratio > 2.5  # int8: ~3.5x with the float LayerNorms; 4-bit: ~6x
    save_quantized(model, tmp_path / "model.safetensors")
    fresh, _ = tiny_classifier()
    load_quantized(fresh, tmp_path / "model.safetensors")
    assert torch.equal(fresh(ids), logits)  # identical logits after the round trip


def test_int8_model_is_close_and_4x_smaller():
    model, ids = tiny_classifier()
    reference = model(ids)
    report = quantize_model(model, "int8")
    assert (model(ids) - reference).abs().max() < 0.02
    linear_rows = report.by_kind()["Int8Linear"]
    assert 3.5 < 32 / linear_rows.bits_per_param < 4.0  # 8 bits per weight + a float scale per row


def test_quantize_model_refuses_bad_input():
    model, _ = tiny_classifier()
    with pytest.raises(ValueError, match="unknown quantization method 'int3'"):
        quantize_model(model, "int3")
    with pytest.raises(ValueError, match=r"skip names \['encoder'\] match no module"):
        quantize_model(model, "int8", skip=["encoder"])
    with pytest.raises(ValueError, match="group_size 48 does not divide in_features 64"):
        Int4Linear.from_linear(nn.Linear(64, 8), group_size=48)
    with pytest.raises(TypeError, match="expected an nn.Linear, got Conv1d"):
        Int8Linear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="outlier threshold must be positive"):
        W8A8Linear.from_linear(nn.Linear(8, 8), threshold=0.0)


def test_load_quantized_refuses_a_plain_file(tmp_path):
    from tunelab.core.io import write_safetensors

    model, _ = tiny_classifier()
    write_safetensors(tmp_path / "plain.safetensors", model.state_dict())
    with pytest.raises(ValueError, match="not written by save_quantized"):
        load_quantized(model, tmp_path / "plain.safetensors")
