"""TransformerClassifier: shapes, padding invariance, gradients, learning, config round trip, errors."""

import json

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import assert_close
from tunelab.core.classifier import ClassifierConfig, TransformerClassifier

POOLINGS = ["mean", "max", "cls"]


def batch(lengths=(9, 5, 2, 7), vocab_size=100, pad_id=0, T=None):
    """Right-padded (input_ids, attention_mask) with real ids in [1, vocab_size) and pad_id after."""
    T = T or max(lengths)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()  # (B, T)
    ids = torch.randint(1, vocab_size, (len(lengths), T)).masked_fill(mask == 0, pad_id)  # (B, T)
    return ids, mask


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("norm_first", [True, False])
def test_output_shape(pooling, norm_first):
    model = TransformerClassifier(ClassifierConfig.tiny(pooling=pooling, norm_first=norm_first, num_classes=3))
    ids, mask = batch()
    logits = model(input_ids=ids, attention_mask=mask)
    assert logits.shape == (4, 3)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("bigram_buckets", [0, 53])
@pytest.mark.parametrize("attn_impl", ["fused", "explicit"])
@pytest.mark.parametrize("positional", ["sinusoidal", "learned"])
@pytest.mark.parametrize("pooling", POOLINGS)
def test_extra_padding_does_not_change_logits(pooling, positional, attn_impl, bigram_buckets):
    config = ClassifierConfig.tiny(pooling=pooling, positional=positional, attn_impl=attn_impl, dropout=0.1,
                                   bigram_buckets=bigram_buckets)
    model = TransformerClassifier(config).eval()
    ids, mask = batch()
    logits = model(ids, mask)
    extra = 6
    # Padded positions hold random ids, not just pad_id: the mask alone must hide them.
    longer_ids = torch.cat([ids, torch.randint(1, 100, (4, extra))], dim=1)
    longer_mask = torch.cat([mask, torch.zeros(4, extra, dtype=torch.long)], dim=1)
    assert_close(model(longer_ids, longer_mask), logits)
    # Each row classified alone, unpadded, gives the same logits as inside the padded batch.
    for row, length in enumerate(mask.sum(dim=1).tolist()):
        assert_close(model(ids[row : row + 1, :length]), logits[row : row + 1])


@pytest.mark.parametrize("pooling", POOLINGS)
def test_all_ones_mask_equals_no_mask(pooling):
    model = TransformerClassifier(ClassifierConfig.tiny(pooling=pooling)).eval()
    ids, mask = batch(lengths=(8, 8))
    assert mask.all()
    assert_close(model(ids, mask), model(ids))
    assert_close(model(ids, mask.bool()), model(ids))


@pytest.mark.parametrize("pooling", POOLINGS)
def test_fully_padded_row_gives_finite_logits(pooling):
    model = TransformerClassifier(ClassifierConfig.tiny(pooling=pooling)).eval()
    ids, mask = batch(lengths=(6, 3))
    mask[1] = 0
    logits = model(ids, mask)
    assert torch.isfinite(logits).all()
    if pooling != "cls":  # nothing to pool: the pooled vector is 0, so the logits are the head bias
        assert_close(logits[1], model.head.bias)


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("positional", ["sinusoidal", "learned"])
def test_gradient_reaches_every_parameter(pooling, positional):
    config = ClassifierConfig.tiny(pooling=pooling, positional=positional, dropout=0.1, bigram_buckets=1000)
    model = TransformerClassifier(config)
    ids, mask = batch()
    F.cross_entropy(model(ids, mask), torch.tensor([0, 1, 1, 0])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # The pad row is frozen (padding_idx) and never used under the mask; so is "no next token".
    assert (model.token_embedding.weight.grad[0] == 0).all()
    assert (model.bigram_embedding.weight.grad[0] == 0).all()


def test_bigram_rows_depend_on_the_pair_only():
    model = TransformerClassifier(ClassifierConfig.tiny(vocab_size=50, bigram_buckets=1009))
    ids = torch.tensor([[3, 7, 3, 7, 9, 0, 0], [7, 3, 3, 7, 0, 0, 0]])  # (B, T)
    mask = (ids != 0).long()
    rows = model.bigram_ids(ids, mask)
    assert rows[0, 0] == rows[0, 2] == rows[1, 2]  # (3, 7) wherever it occurs
    assert rows[0, 1] == rows[1, 0]  # (7, 3)
    assert rows[0, 0] != rows[0, 1]  # order matters: (3, 7) is not (7, 3)
    assert rows[0, 3] != rows[0, 0]  # (7, 9)
    assert (rows[0, 4:] == 0).all() and (rows[1, 3:] == 0).all()  # last real token and padding: no pair
    assert rows.min() >= 0 and rows.max() <= 1009  # row 0 is reserved for "no pair"
    # Without a mask only the last position lacks a next token.
    assert (model.bigram_ids(ids, None)[:, :-1] > 0).all() and (model.bigram_ids(ids, None)[:, -1] == 0).all()
    # All 49 x 49 pairs of real tokens spread over the table: few collisions.
    a, b = torch.meshgrid(torch.arange(1, 50), torch.arange(1, 50), indexing="ij")
    every = model.bigram_ids(torch.stack([a.flatten(), b.flatten()], dim=1), None)[:, 0]  # (2401,)
    assert every.unique().numel() > 0.85 * 1009  # a uniform hash fills ~91% of 1009 rows with 2401 pairs


def test_bigrams_make_the_model_see_word_order():
    """Mean pooling with no positions and no layers is a bag of words, unless bigrams are on."""
    ids = torch.tensor([[5, 6, 7, 8]])
    swapped = torch.tensor([[6, 5, 8, 7]])
    for buckets, order_matters in ((0, False), (97, True)):
        config = ClassifierConfig.tiny(n_layers=0, positional="learned", bigram_buckets=buckets)
        model = TransformerClassifier(config).eval()
        torch.nn.init.zeros_(model.position.embedding.weight)
        changed = not torch.allclose(model(ids), model(swapped), atol=1e-6)
        assert changed == order_matters


@pytest.mark.parametrize("pooling", POOLINGS)
def test_a_few_steps_on_one_batch_lower_the_loss(pooling):
    model = TransformerClassifier(ClassifierConfig.tiny(pooling=pooling))
    ids, mask = batch(lengths=(9, 5, 2, 7, 3, 8))
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(model(ids, mask), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_cls_pooling_ignores_the_cls_position_in_max_len():
    # The cls vector has no position, so a max_len-long input still fits.
    model = TransformerClassifier(ClassifierConfig.tiny(pooling="cls", max_len=8))
    ids, mask = batch(lengths=(8, 4))
    assert model(ids, mask).shape == (2, 2)


def test_config_round_trip_through_json():
    config = ClassifierConfig.tiny(
        pooling="cls", positional="learned", norm_first=False, embedding_dropout=0.2, attention_dropout=0.1
    )
    restored = ClassifierConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert restored.to_dict()["embedding_dropout"] == 0.2
    # Same config + same weights = same model.
    model = TransformerClassifier(config).eval()
    clone = TransformerClassifier(restored).eval()
    clone.load_state_dict(model.state_dict())
    ids, mask = batch()
    assert_close(clone(ids, mask), model(ids, mask))


def test_dropout_settings_reach_their_modules():
    model = TransformerClassifier(ClassifierConfig.tiny(dropout=0.3))
    assert model.embedding_dropout.p == 0.3 and model.head_dropout.p == 0.3
    assert model.layers[0].ff.dropout.p == 0.3 and model.layers[0].dropout1.p == 0.3
    assert model.layers[0].attn.dropout == 0.0  # attention dropout is off unless asked for
    model = TransformerClassifier(ClassifierConfig.tiny(dropout=0.3, embedding_dropout=0.0, attention_dropout=0.1))
    assert model.embedding_dropout.p == 0.0
    assert all(layer.attn.dropout == 0.1 for layer in model.layers)


def test_token_dropout_hides_real_tokens_only_while_training():
    config = ClassifierConfig.tiny(token_dropout=0.3, max_len=400)
    model = TransformerClassifier(config)
    ids, mask = batch(lengths=(400, 250, 1, 90), T=400)
    kept = model.drop_tokens(ids, mask)
    assert not (kept.bool() & ~mask.bool()).any()  # padding stays hidden
    assert (kept.sum(dim=1) >= 1).all()  # the one-token row keeps its token
    dropped = 1 - kept[mask.bool()].float().mean()
    assert 0.25 < dropped < 0.35  # about token_dropout of the 741 real tokens
    # In eval mode nothing is dropped: the same weights without token dropout give the same logits.
    plain = TransformerClassifier(ClassifierConfig.tiny(max_len=400)).eval()
    plain.load_state_dict(model.state_dict())
    model.eval()
    assert_close(model(ids, mask), plain(ids, mask))
    model.train()
    torch.manual_seed(0)
    assert not torch.allclose(model(ids, mask), plain(ids, mask))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(d_model=30, n_heads=4), r"d_model \(30\) must be divisible by n_heads \(4\)"),
        (dict(pooling="sum"), r"unknown pooling 'sum'"),
        (dict(positional="rope"), r"unknown positional 'rope'"),
        (dict(attn_impl="flash"), r"unknown attn_impl 'flash'"),
        (dict(activation="swish"), r"unknown activation 'swish'"),
        (dict(dropout=1.5), r"dropout must be in \[0, 1\)"),
        (dict(attention_dropout=-0.1), r"attention_dropout must be in \[0, 1\)"),
        (dict(num_classes=1), r"num_classes must be >= 2"),
        (dict(pad_id=100), r"pad_id 100 .* vocab_size 100"),
        (dict(d_model=16.0), r"d_model must be an int"),
        (dict(bigram_buckets=-1), r"bigram_buckets must be >= 0"),
        (dict(token_dropout=1.0), r"token_dropout must be in \[0, 1\)"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        ClassifierConfig.tiny(**overrides)


def test_from_dict_errors():
    with pytest.raises(ValueError, match=r"unknown ClassifierConfig keys \['hidden_size'\]"):
        ClassifierConfig.from_dict({"vocab_size": 10, "hidden_size": 8})
    with pytest.raises(ValueError, match="vocab_size"):
        ClassifierConfig.from_dict({"d_model": 8, "n_heads": 2})


def test_input_errors():
    model = TransformerClassifier(ClassifierConfig.tiny(max_len=8))
    ids, mask = batch(lengths=(9, 3))
    with pytest.raises(ValueError, match=r"sequence length 9 is longer than max_len 8"):
        model(ids, mask)
    ids, mask = batch(lengths=(5, 3))
    with pytest.raises(ValueError, match=r"attention_mask shape \(2, 4\) does not match input_ids shape \(2, 5\)"):
        model(ids, mask[:, :4])
    with pytest.raises(ValueError, match=r"shape \(B, T\)"):
        model(ids[0])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 100\)"):
        model(ids + 100, mask)
