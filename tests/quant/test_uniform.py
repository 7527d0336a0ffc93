"""Uniform quantization: the s / 2 error bound, schemes, granularities, calibration, packing, torch.ao parity,
the straight-through estimator, LSQ, QAT layers, and the refusals."""

import warnings

import pytest
import torch
from torch import nn

from tests.conftest import assert_close
from tunelab.quant.uniform import (CALIBRATIONS, GRANULARITIES, SCHEMES, FakeQuantize, QATEmbedding, QATLinear,
                                   apply_qat, choose_qparams, fake_quantize, pack, qat_layers, quant_range, quantize,
                                   unload_qat, unpack)

GROUP = 16  # group size used with a last dimension of 64


def per_element(q, values):
    """A per-block tensor (scale or zero point) broadcast to every element, in the input's shape."""
    blocked_shape = q.codes.shape if q.granularity != "group" else (*q.shape[:-1], q.shape[-1] // GROUP, GROUP)
    return values.float().expand(blocked_shape).reshape(q.shape)


def clipping_range(q):
    """The values the grid covers, element-wise: [(qmin - z) s, (qmax - z) s]."""
    qmin, qmax = quant_range(q.bits, q.scheme)
    scale = per_element(q, q.scale)
    zero = 0.0 if q.zero_point is None else per_element(q, q.zero_point)
    return (qmin - zero) * scale, (qmax - zero) * scale


def relu_outputs(n=4096):
    return torch.relu(torch.randn(32, n // 32) + 0.3)  # (32, 128): non-negative, a third exact zeros


def test_quant_range():
    assert quant_range(8, "symmetric") == (-127, 127)  # restricted, as LLM.int8() / bitsandbytes
    assert quant_range(4, "symmetric") == (-7, 7)
    assert quant_range(2, "symmetric") == (-1, 1)
    assert quant_range(8, "asymmetric") == (0, 255)
    assert quant_range(3, "asymmetric") == (0, 7)


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_round_trip_error_is_at_most_half_a_step(scheme, granularity, bits):
    x = torch.randn(8, 64) * torch.logspace(-2, 1, 8)[:, None] + 0.3  # rows of very different sizes, shifted
    q = quantize(x, bits, scheme, granularity, group_size=GROUP)
    qmin, qmax = quant_range(bits, scheme)
    assert q.codes.shape == x.shape and q.codes.dtype == (torch.int8 if scheme == "symmetric" else torch.uint8)
    assert qmin <= int(q.codes.min()) and int(q.codes.max()) <= qmax
    expected_scale_shape = {"tensor": (), "channel": (8, 1), "group": (8, 64 // GROUP, 1)}[granularity]
    assert q.scale.shape == expected_scale_shape and q.scale.dtype == torch.float32
    assert (q.zero_point is None) == (scheme == "symmetric")
    error = (q.dequantize() - x).abs()
    assert q.dequantize().dtype == torch.float32 and q.dequantize().shape == x.shape
    assert bool((error <= per_element(q, q.scale) / 2 * (1 + 1e-6)).all())
    assert error.max() > 0.2 * q.scale.min()  # the bound is not met trivially: rounding really happened


@pytest.mark.parametrize("calibration", ["percentile", "mse"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_clipping_calibrations_keep_the_bound_inside_the_range_and_clip_outside(scheme, calibration):
    x = torch.distributions.StudentT(2.0).sample((16, 256))  # heavy tails: the calibrations clip
    q = quantize(x, 4, scheme, "channel", calibration=calibration, percentile=99)
    lo, hi = clipping_range(q)
    inside = (x >= lo) & (x <= hi)
    error = (q.dequantize() - x).abs()
    assert 0.9 < inside.float().mean() < 1  # some values are clipped, most are not
    assert bool((error[inside] <= per_element(q, q.scale)[inside] / 2 * (1 + 1e-6)).all())
    assert_close(q.dequantize()[~inside], torch.where(x > hi, hi, lo)[~inside])  # clipped to the range's edge


def test_asymmetric_beats_symmetric_on_relu_outputs():
    x = relu_outputs()
    sym, asym = quantize(x, 4, "symmetric"), quantize(x, 4, "asymmetric")
    mse_sym, mse_asym = ((sym.dequantize() - x) ** 2).mean(), ((asym.dequantize() - x) ** 2).mean()
    # symmetric spends half its 15 codes on negatives that never occur: step max / 7 against max / 15
    assert_close(sym.scale / asym.scale, torch.tensor(15 / 7))
    assert mse_asym < 0.35 * mse_sym  # (7 / 15)^2 = 0.22
    assert int(asym.zero_point) == 0 and torch.equal(asym.dequantize()[x == 0], x[x == 0])  # zeros exact
    shifted = torch.randn(4096) - 3  # all-negative data: the zero point sits at the top of the grid
    assert int(quantize(shifted, 4, "asymmetric").zero_point) > 12
    centred = torch.randn(4096)  # on zero-centred data the two are close
    mse = [((quantize(centred, 4, s).dequantize() - centred) ** 2).mean() for s in SCHEMES]
    assert mse[0] < 1.5 * mse[1]


def test_per_group_scales_are_the_absmax_of_each_group():
    x = torch.randn(4, 64) * torch.arange(1, 5).repeat(4)[:, None].repeat(1, 16).reshape(4, 64)  # groups differ
    q = quantize(x, 4, granularity="group", group_size=16)
    by_hand = x.reshape(4, 4, 16).abs().amax(dim=-1, keepdim=True) / 7  # (out, groups, 1)
    assert_close(q.scale, by_hand)
    assert q.scale.unique().numel() == 16  # one distinct scale per group
    channel = quantize(x, 4, granularity="channel", axis=1)  # any axis: one scale per column
    assert channel.scale.shape == (1, 64) and channel.axis == 1
    assert_close(channel.scale, x.abs().amax(dim=0, keepdim=True) / 7)


def test_finer_granularity_wins_on_outlier_rows_and_columns():
    """Outliers stretch the grid of every weight that shares their scale; the error is measured on the others."""
    w = torch.randn(64, 256)
    rows = w.clone()
    rows[:4] *= 30  # a few rows (output channels) 30x larger
    ordinary = (slice(4, None), slice(None))
    mse = lambda q, x: float(((q.dequantize() - x)[ordinary] ** 2).mean())  # noqa: E731
    tensor, channel = mse(quantize(rows, 4), rows), mse(quantize(rows, 4, granularity="channel"), rows)
    assert channel < 0.05 * tensor  # 0.016 against 1.0: on the stretched grid most ordinary weights round to 0
    cols = w.clone()
    cols[:, 7] *= 30  # one outlier input column: it sits in every row, so per-row scales do not help
    ordinary = (slice(None), slice(32, None))  # the columns outside the outlier's group
    tensor, channel = mse(quantize(cols, 4), cols), mse(quantize(cols, 4, granularity="channel"), cols)
    group = mse(quantize(cols, 4, granularity="group", group_size=32), cols)
    assert channel > 0.5 * tensor  # per-channel: barely better
    assert group < 0.05 * channel  # 0.009 against 0.59: per-group: only the group holding the outlier pays


def test_bits_per_param_counts_codes_scales_and_zero_points():
    x = torch.randn(32, 64)
    assert quantize(x, 8).bits_per_param == 8 + 32 / 2048
    assert quantize(x, 4, granularity="channel").bits_per_param == 4 + 32 / 64
    assert quantize(x, 4, granularity="group", group_size=32).bits_per_param == 4 + 32 / 32
    assert quantize(x, 4, "asymmetric", "group", group_size=32).bits_per_param == 4 + (32 + 4) / 32


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n", [1, 3, 7, 64, 1001])
def test_pack_unpack_round_trip(bits, n):
    codes = torch.randint(0, 2**bits, (n,), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n * bits // 8)  # ceil(n * bits / 8) bytes
    assert torch.equal(unpack(packed, bits, n), codes)
    assert torch.equal(unpack(pack(codes.reshape(1, n).to(torch.int64), bits), bits, n), codes)  # any int dtype


def test_pack_puts_the_first_code_in_the_high_bits():
    assert pack(torch.tensor([0x1, 0x2, 0xA]), 4).tolist() == [0x12, 0xA0]  # odd length: zero-padded low nibble
    assert pack(torch.tensor([1, 2, 3, 0, 3]), 2).tolist() == [0b01_10_11_00, 0b11_00_00_00]
    assert pack(torch.tensor([7, 200]), 8).tolist() == [7, 200]


def test_unpack_reads_bitsandbytes_nf4_bytes():
    """bitsandbytes packs NF4 codes two per byte, first in the high nibble: our unpack reads its bytes."""
    functional = pytest.importorskip("bitsandbytes.functional",
                                     reason="needs bitsandbytes (the test extra): pip install bitsandbytes")
    t = torch.randn(130)
    packed, state = functional.quantize_4bit(t, quant_type="nf4", blocksize=64)
    codes = unpack(packed.flatten(), 4, t.numel()).long()
    by_hand = state.code[codes] * state.absmax.repeat_interleave(64)[: t.numel()]
    assert_close(by_hand, functional.dequantize_4bit(packed, state).flatten())
    assert torch.equal(pack(codes, 4), packed.flatten())


def test_int8_per_channel_codes_equal_torch_ao():
    w = torch.randn(16, 48)
    w[0, :8] = torch.tensor([127, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5])  # ties: both round half to even
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch.ao's quantized tensors are deprecated
        q = quantize(w, 8, granularity="channel")
        assert float(q.scale[0]) == 1.0
        ref = torch.quantize_per_channel(w, q.scale.flatten().double(), torch.zeros(16, dtype=torch.long), 0,
                                         torch.qint8)
        assert torch.equal(q.codes, ref.int_repr())
        assert q.codes[0, :8].tolist() == [127, 0, 2, 2, 0, -2, -2, 126]
        qa = quantize(w, 8, "asymmetric", "channel")
        ref = torch.quantize_per_channel(w, qa.scale.flatten().double(), qa.zero_point.flatten().long(), 0,
                                         torch.quint8)
        assert torch.equal(qa.codes, ref.int_repr())
        qt = quantize(w, 8, "asymmetric")
        ref = torch.quantize_per_tensor(w, float(qt.scale), int(qt.zero_point), torch.quint8)
        assert torch.equal(qt.codes, ref.int_repr())
        assert torch.equal(qt.dequantize(), ref.dequantize())


def test_fake_quantize_gradient_is_the_straight_through_estimator():
    x = torch.linspace(-3, 3, 601, requires_grad=True)
    scale, qmin, qmax = torch.tensor(0.2), -7, 7  # the grid covers [-1.4, 1.4]
    y = fake_quantize(x, scale, None, qmin, qmax)
    weights = torch.randn(601)
    (y * weights).sum().backward()
    codes = torch.round(x.detach() / scale)
    inside = (codes >= qmin) & (codes <= qmax)
    assert 0.3 < inside.float().mean() < 0.7
    assert torch.equal(x.grad, torch.where(inside, weights, torch.zeros(())))  # exactly 1 inside, 0 outside
    assert_close(y, torch.fake_quantize_per_tensor_affine(x.detach(), 0.2, 0, qmin, qmax))


def test_fake_quantize_matches_torch_per_channel_with_zero_points():
    x = torch.randn(6, 20, requires_grad=True)
    scale, zero_point = choose_qparams(x.detach() * 0.7, 4, "asymmetric", "channel")  # clips some values
    ours = fake_quantize(x, scale, zero_point, 0, 15)
    ours.sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    ref = torch.fake_quantize_per_channel_affine(x_ref, scale.flatten(), zero_point.flatten(), 0, 0, 15)
    ref.sum().backward()
    assert_close(ours, ref)
    assert torch.equal(x.grad, x_ref.grad) and 0 < x.grad.sum() < x.numel()


def test_lsq_scale_gradient_is_the_paper_equation_and_torch_learnable_fake_quant():
    x = torch.tensor([0.26, -0.9, 3.0, -5.0, 0.0])
    scale = torch.tensor(0.5, requires_grad=True)
    fake_quantize(x, scale, None, -3, 3, grad_scale=0.5).sum().backward()
    # Esser et al. 2020, eq. 3: -x/s + round(x/s) inside, qmin / qmax outside; 0.26/0.5 = 0.52 -> 1, -1.8 -> -2
    by_hand = (1 - 0.52) + (-2 + 1.8) + 3 + (-3) + 0
    assert_close(scale.grad, torch.tensor(0.5 * by_hand))
    s_ref = torch.tensor([0.5], requires_grad=True)
    torch._fake_quantize_learnable_per_tensor_affine(x, s_ref, torch.zeros(1), -3, 3, 0.5).sum().backward()
    assert_close(scale.grad, s_ref.grad[0])


def test_lsq_scale_trains_and_lowers_the_loss():
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    qat = QATLinear.from_linear(nn.Linear(64, 32), FakeQuantize(bits=3, granularity="channel", learn_scale=True))
    qat.load_state_dict({**layer.state_dict(), "weight_fake_quant.scale": qat.weight_fake_quant.scale})
    qat.weight.requires_grad_(False)
    qat.bias.requires_grad_(False)
    start = qat.weight_fake_quant.scale.detach().clone()
    assert start.shape == (32, 1)
    optimizer = torch.optim.Adam([qat.weight_fake_quant.scale], lr=1e-3)
    x = torch.randn(256, 64)
    target = layer(x).detach()
    losses = []
    for _ in range(30):
        loss = ((qat(x) - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        assert qat.weight_fake_quant.scale.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]  # minmax's scale is not the best one at 3 bits
    assert not torch.equal(qat.weight_fake_quant.scale, start)


def test_mse_calibration_beats_minmax_on_heavy_tails_and_percentile_clips():
    x = torch.distributions.StudentT(3.0).sample((64, 256))  # heavy tails: the largest value is ~30 std
    mse = {c: float(((quantize(x, 4, calibration=c).dequantize() - x) ** 2).mean()) for c in CALIBRATIONS}
    assert mse["mse"] < 0.5 * mse["minmax"]  # 0.29 against 1.17
    assert mse["mse"] < mse["percentile"]  # 0.77 at the 99.99th percentile
    q = quantize(x, 4, calibration="percentile", percentile=99.0)
    absmax = 7 * float(q.scale)
    assert absmax < 0.5 * float(x.abs().max())  # the range ends well inside the tails
    expected = torch.maximum(-torch.quantile(x.flatten(), 0.01), torch.quantile(x.flatten(), 0.99))
    assert_close(q.scale, expected / 7)  # the 1st and 99th percentiles (torch.quantile), the wider of the two
    assert float(q.dequantize().abs().max()) == pytest.approx(absmax)  # outliers land on the edge of the grid


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_zero_and_constant_tensors(scheme, granularity):
    zeros = torch.zeros(4, 32)
    q = quantize(zeros, 4, scheme, granularity, group_size=GROUP)
    assert torch.equal(q.scale, torch.ones_like(q.scale)) and torch.equal(q.dequantize(), zeros)
    for value in (3.0, -0.25, 1e-39):  # 1e-39 is subnormal: 1 / scale must not overflow
        x = torch.full((4, 32), value)
        for calibration in CALIBRATIONS:
            q = quantize(x, 4, scheme, granularity, group_size=GROUP, calibration=calibration)
            assert bool(torch.isfinite(q.scale).all()) and bool((q.scale > 0).all())
            error = (q.dequantize() - x).abs()
            assert bool((error <= per_element(q, q.scale) / 2 * (1 + 1e-6)).all()), (value, calibration)
            if value == 3.0:
                assert_close(q.dequantize(), x)


@pytest.mark.parametrize("call, message", [
    (lambda x: quantize(x, 1), "bits must be an integer in 2..8, got 1"),
    (lambda x: quantize(x, 9), "bits must be an integer in 2..8, got 9"),
    (lambda x: quantize(x, 4.0), "bits must be an integer in 2..8, got 4.0"),
    (lambda x: quantize(x, scheme="sym"), "unknown scheme 'sym'"),
    (lambda x: quantize(x, granularity="row"), "unknown granularity 'row'"),
    (lambda x: quantize(x, calibration="max"), "unknown calibration 'max'"),
    (lambda x: quantize(x, granularity="group", group_size=5), "group_size 5 does not divide the last dimension 12"),
    (lambda x: quantize(x, granularity="group"), "needs a positive integer group_size, got None"),
    (lambda x: quantize(x, granularity="channel", axis=2), "axis 2 is out of range"),
    (lambda x: quantize(x, calibration="percentile", percentile=30), "percentile must be in \\(50, 100\\], got 30"),
    (lambda x: quantize(x.clone().index_fill_(1, torch.tensor([3]), float("nan"))), "2 NaN or Inf values"),
    (lambda x: quantize(x.clone().index_fill_(1, torch.tensor([3]), float("inf"))), "2 NaN or Inf values"),
    (lambda x: quantize(torch.zeros(0, 3)), "empty tensor"),
    (lambda x: pack(torch.tensor([1, 2]), 3), "pack handles bits in \\(2, 4, 8\\).*got 3"),
    (lambda x: pack(torch.tensor([1, 16]), 4), "codes must lie in \\[0, 16\\), got values in \\[1, 16\\]"),
    (lambda x: pack(torch.tensor([-1, 2]), 4), "codes must lie in \\[0, 16\\), got values in \\[-1, 2\\]"),
    (lambda x: unpack(torch.zeros(2, dtype=torch.uint8), 4, 5), "numel 5 does not fit in 2 bytes"),
    (lambda x: unpack(torch.zeros(2, dtype=torch.uint8), 5, 1), "unpack handles bits in"),
    (lambda x: FakeQuantize(bits=4, scheme="asymmetric", learn_scale=True), "symmetric grid; got scheme 'asymmetric'"),
])
def test_bad_input_is_refused_with_a_message_naming_it(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.randn(2, 12))


@pytest.mark.parametrize("call, message", [
    (lambda: quantize(torch.arange(6)), "floating-point tensor, got torch.int64"),
    (lambda: pack(torch.tensor([0.0, 1.0]), 4), "integer tensor of codes, got torch.float32"),
    (lambda: unpack(torch.zeros(2, dtype=torch.int32), 4, 1), "uint8 bytes pack returns, got torch.int32"),
])
def test_wrong_types_are_refused(call, message):
    with pytest.raises(TypeError, match=message):
        call()


def small_model():
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 64), nn.ReLU()), nn.Linear(64, 2))


def test_apply_qat_fake_quantizes_each_linear_weight_and_unload_keeps_the_outputs():
    model = small_model()
    float_outputs_input = torch.randn(8, 32)
    weights = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    apply_qat(model, bits=4, granularity="group", group_size=16, skip=["3"])
    assert sorted(qat_layers(model)) == ["0", "2.0"] and type(model[3]) is nn.Linear  # the head stays float
    for name, layer in qat_layers(model).items():
        expected = quantize(weights[name], 4, granularity="group", group_size=16).dequantize()
        assert_close(layer.quantized_weight(), expected)
        x = torch.randn(5, layer.in_features)
        assert_close(layer(x), nn.functional.linear(x, expected, layer.bias))
    model(float_outputs_input).sum().backward()  # the STE lets the float weights train
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        qat_out = model(float_outputs_input)
        unload_qat(model)
        assert not qat_layers(model) and all(type(m) is nn.Linear for m in (model[0], model[2][0], model[3]))
        assert_close(model(float_outputs_input), qat_out)
    for name in ("0", "2.0"):  # the plain weights lie on the 4-bit grid: at most 15 values per group
        w = model.get_submodule(name).weight.detach()
        assert max(row.unique().numel() for row in w.reshape(-1, 16)) <= 15
        assert_close(quantize(w, 4, granularity="group", group_size=16).dequantize(), w)


class Bag(nn.Module):
    """Embedding bag + head: most weights in the table, as in a small text classifier."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(50, 16, padding_idx=0)
        self.head = nn.Linear(16, 2)

    def forward(self, ids):
        return self.head(self.embedding(ids).mean(dim=1))  # (B, 2)


@pytest.mark.parametrize("learn_scale", [False, True], ids=["ste", "lsq"])
def test_apply_qat_with_embeddings_quantizes_the_table_per_row(learn_scale):
    model = Bag()
    table = model.embedding.weight.detach().clone()
    ids = torch.randint(0, 50, (4, 7))
    ids[:, -2:] = 0  # padding
    apply_qat(model, bits=3, embeddings=True, learn_scale=learn_scale)
    assert isinstance(model.embedding, QATEmbedding) and isinstance(model.head, QATLinear)
    expected = quantize(table, 3, granularity="channel").dequantize()  # one scale per token
    assert_close(model.embedding(ids), expected[ids])
    assert torch.equal(model.embedding(ids)[:, -2:], torch.zeros(4, 2, 16))  # the zero padding row stays exact
    model(ids).sum().backward()
    grad = model.embedding.weight.grad
    assert grad[ids[:, :-2].unique()].abs().sum() > 0 and torch.equal(grad[0], torch.zeros(16))  # no grad to pad
    if learn_scale:
        assert model.embedding.weight_fake_quant.scale.shape == (50, 1)
        assert model.embedding.weight_fake_quant.scale.grad.abs().sum() > 0
    with torch.no_grad():
        before = model(ids)
        unload_qat(model)
        assert type(model.embedding) is nn.Embedding and model.embedding.padding_idx == 0
        assert_close(model(ids), before)
    assert type(apply_qat(Bag(), bits=4).embedding) is nn.Embedding  # tables only with embeddings=True


def test_lsq_scale_trained_through_zero_stays_finite():
    quantizer = FakeQuantize(bits=4, learn_scale=True)
    x = torch.randn(10, requires_grad=True)
    quantizer.init_scale(x)
    with torch.no_grad():
        quantizer.scale.fill_(-0.5)  # an optimizer step too large
    y = quantizer(x)
    y.sum().backward()
    assert bool(torch.isfinite(y).all()) and bool(torch.isfinite(quantizer.scale.grad).all())
    assert bool(torch.isfinite(x.grad).all())


def test_qat_with_the_ste_recovers_what_ptq_loses():
    """A 2-bit student trained with fake-quantized weights fits the teacher better than the rounded teacher."""
    teacher = small_model()
    x = torch.randn(512, 32)
    target = teacher(x).detach()
    ptq = unload_qat(apply_qat(small_model_like(teacher), bits=2))
    ptq_loss = ((ptq(x) - target) ** 2).mean().item()
    student = apply_qat(small_model_like(teacher), bits=2)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    for _ in range(60):
        loss = ((student(x) - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    qat_loss = ((unload_qat(student)(x) - target) ** 2).mean().item()
    assert qat_loss < 0.5 * ptq_loss


def small_model_like(model):
    copy = small_model()
    copy.load_state_dict(model.state_dict())
    return copy


def test_apply_qat_refuses_bad_settings_before_changing_the_model():
    model = small_model()
    with pytest.raises(ValueError, match="skip names \\['head'\\] match no module"):
        apply_qat(model, skip=["head"])
    with pytest.raises(ValueError, match="0: group_size 24 does not divide the last dimension 32"):
        apply_qat(model, granularity="group", group_size=24)
    with pytest.raises(ValueError, match="bits must be an integer in 2..8, got 12"):
        apply_qat(model, bits=12)
    assert not qat_layers(model)
    with pytest.raises(ValueError, match="no QAT layers; call apply_qat first"):
        unload_qat(model)
    apply_qat(model)
    with pytest.raises(ValueError, match="already has QAT layers: unload_qat it first"):
        apply_qat(model)  # a second call would wrap nothing: refused, not silently a no-op
    quantizer = FakeQuantize(bits=4, learn_scale=True)
    with pytest.raises(ValueError, match="call init_scale"):
        quantizer(torch.randn(3, 3))
