"""Weight clustering: k values per layer kept through training, centroid gradients, strip, frozen zeros, sizes,
the safetensors round trip and refusals."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import assert_close
from tunelab.core.classifier import ClassifierConfig, TransformerClassifier
from tunelab.core.io import read_safetensors
from tunelab.core.train import TrainConfig, train_model
from tunelab.quant.cluster import (ClusteredEmbedding, ClusteredLinear, ClusteredWeight, cluster_weights,
                                   clustered_layers, fit_codebook, index_bits, load_clustered, pack_mask,
                                   save_clustered, strip_clustering, unpack_mask)
from tunelab.quant.kmeans import kmeans_objective


def tiny_model(**overrides) -> TransformerClassifier:
    return TransformerClassifier(ClassifierConfig.tiny(bigram_buckets=40, **overrides))


def batch(n=6, length=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, length), generator=generator)
    return ids, (ids[:, :1] % 2).flatten()  # a learnable label: the parity of the first token


def prune_in_place(layer: nn.Module, fraction: float) -> torch.Tensor:
    """Zero the smallest |w| (a stand-in for magnitude pruning); returns the zero mask."""
    w = layer.weight.data
    threshold = w.abs().flatten().kthvalue(int(fraction * w.numel())).values
    w[w.abs() <= threshold] = 0.0
    return w == 0


def test_index_bits_round_up_to_2_4_or_8():
    assert {k: index_bits(k) for k in (2, 3, 4, 5, 16, 17, 32, 256)} == {2: 2, 3: 2, 4: 2, 5: 4, 16: 4, 17: 8,
                                                                          32: 8, 256: 8}


def test_at_most_k_values_per_layer_kept_through_cluster_preserving_training():
    model = cluster_weights(tiny_model(), n_clusters=8, skip=["head"])
    layers = clustered_layers(model)
    assert len(layers) == 2 + 2 * 6  # two embeddings, six linear layers in each of two encoder layers
    indices_before = {name: m.indices.clone() for name, m in layers.items()}
    centroids_before = {name: m.centroids.detach().clone() for name, m in layers.items()}
    for m in layers.values():  # only the codebook and the bias train; the indices are a buffer
        assert {n for n, _ in m.named_parameters()} <= {"centroids", "bias"}
    ids, labels = batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(ids), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, m in layers.items():
        assert m.dequantize_weight().unique().numel() <= 8, name
        assert torch.equal(m.indices, indices_before[name]), name
        assert not torch.equal(m.centroids.detach(), centroids_before[name]), name  # the codebook moved


def test_train_model_trains_the_centroids_and_its_checkpoints_reload(tmp_path):
    model = cluster_weights(tiny_model(), n_clusters=4, embeddings=False)
    ids, labels = batch(n=16)
    data = [{"input_ids": i, "labels": y} for i, y in zip(ids, labels)]
    collate = lambda rows: {"input_ids": torch.stack([r["input_ids"] for r in rows]),  # noqa: E731
                            "labels": torch.stack([r["labels"] for r in rows])}
    indices = {name: m.indices.clone() for name, m in clustered_layers(model).items()}
    train_model(model, data, collate_fn=collate, config=TrainConfig.tiny(epochs=2, out_dir=tmp_path))
    for name, m in clustered_layers(model).items():
        assert torch.equal(m.indices, indices[name]) and m.dequantize_weight().unique().numel() <= 4
    saved = read_safetensors(tmp_path / "checkpoints" / "last" / "model.safetensors")
    assert "head.packed_indices" in saved and "head.weight" not in saved  # the packed form is what is saved


@pytest.mark.parametrize("bias", [True, False])
def test_centroid_gradient_is_the_sum_of_its_members_weight_gradients(bias):
    dense = nn.Linear(12, 7, bias=bias)
    layer = ClusteredLinear.from_linear(dense, n_clusters=6)
    x = torch.randn(5, 12)
    target = torch.randn(5, 7)
    ((layer(x) - target) ** 2).sum().backward()
    weight = layer.dequantize_weight().detach().requires_grad_()  # the same function of a free dense weight
    ((F.linear(x, weight, None if layer.bias is None else layer.bias.detach()) - target) ** 2).sum().backward()
    expected = torch.zeros(6).index_add_(0, layer.indices.flatten().long(), weight.grad.flatten())
    assert_close(layer.centroids.grad, expected)


def test_embedding_centroid_gradient_sums_members_and_skips_the_padding_row():
    table = nn.Embedding(20, 5, padding_idx=0)
    layer = ClusteredEmbedding.from_embedding(table, n_clusters=8)
    ids = torch.tensor([[0, 3, 3, 7], [19, 0, 2, 3]])
    upstream = torch.randn(2, 4, 5)
    (layer(ids) * upstream).sum().backward()
    plain = layer.to_plain()  # nn.Embedding with the padding row's gradient zeroed
    (plain(ids) * upstream).sum().backward()
    expected = torch.zeros(8).index_add_(0, layer.indices.flatten().long(), plain.weight.grad.flatten())
    assert_close(layer.centroids.grad, expected)
    assert plain.weight.grad[0].abs().sum() == 0


def test_strip_clustering_gives_plain_layers_with_the_same_outputs():
    model = cluster_weights(tiny_model(), n_clusters=16).eval()
    ids, _ = batch()
    clustered_logits = model(ids)
    stripped = strip_clustering(model)
    assert not any(isinstance(m, ClusteredWeight) for m in stripped.modules())
    assert isinstance(stripped.head, nn.Linear) and isinstance(stripped.token_embedding, nn.Embedding)
    assert stripped.token_embedding.padding_idx == 0
    assert stripped.layers[0].ff.linear1.weight.unique().numel() <= 16
    assert_close(stripped(ids), clustered_logits)


def test_preserve_sparsity_pins_an_exact_zero_centroid_and_pruned_weights_stay_zero():
    dense = nn.Linear(32, 16)
    pruned = prune_in_place(dense, 0.6)
    layer = ClusteredLinear.from_linear(dense, n_clusters=8, preserve_sparsity=True)
    z = layer.zero_index
    assert z is not None and layer.centroids[z] == 0
    assert torch.all(layer.centroids[1:] >= layer.centroids[:-1])  # still ascending with the zero inserted
    assert torch.equal(layer.indices == z, pruned)  # exactly the pruned weights use the zero centroid
    x = torch.randn(8, 32)

    def train(module):
        optimizer = torch.optim.AdamW(module.parameters(), lr=0.05, weight_decay=0.1)
        for _ in range(10):
            optimizer.zero_grad()
            (module(x) ** 2).mean().backward()
            if module.zero_index is not None:
                assert module.centroids.grad[module.zero_index] == 0
            optimizer.step()

    train(layer)
    weight = layer.dequantize_weight()
    assert layer.centroids[z].item() == 0.0
    assert torch.equal(weight == 0, pruned)  # zeros stayed exactly zero, no other weight became zero
    assert layer.size_info()["nonzeros"] == int((~pruned).sum()) + int(layer.bias.count_nonzero())
    # Plain k-means gives the zeros a cluster too (its mean is 0), but that centroid trains away from 0.
    without = ClusteredLinear.from_linear(dense, n_clusters=8, preserve_sparsity=False)
    assert without.zero_index is None
    train(without)
    assert int((without.dequantize_weight() == 0).sum()) == 0


@pytest.mark.parametrize("init", ["linear", "random", "density", "kmeans++", "LINEAR", "DENSITY_BASED",
                                  "RANDOM", "KMEANS_PLUS_PLUS"])
def test_every_init_clusters_a_layer(init):
    layer = ClusteredLinear.from_linear(nn.Linear(64, 32), n_clusters=16, init=init)
    assert layer.dequantize_weight().unique().numel() <= 16
    assert int(layer.indices.max()) < 16


def test_kmeans_plus_plus_gives_the_lowest_clustering_objective_on_a_normal_weight():
    weight = 0.05 * torch.randn(256, 256)
    objective = {}
    for k in (16, 64):
        for init in ("linear", "random", "density", "kmeans++"):
            centroids, indices, _ = fit_codebook(weight, k, init, generator=torch.Generator().manual_seed(0))
            objective[k, init] = kmeans_objective(weight, centroids, indices.flatten().long())
    # measured: k=16 linear 29.5, random 24.9, density 25.3, k-means++ 24.2 (x 1e-6 per weight); k=64: 3.8, 3.5,
    # 3.8, 1.8. 30 Lloyd iterations from evenly spaced starts leave the crowded middle under-served.
    assert objective[16, "kmeans++"] < 0.9 * objective[16, "linear"]
    for init in ("linear", "random", "density"):
        assert objective[64, "kmeans++"] < 0.7 * objective[64, init], objective


@pytest.mark.parametrize("k", [3, 4, 16, 32, 256])
def test_size_info_equals_the_formula_and_the_saved_bytes(k):
    layer = ClusteredLinear.from_linear(nn.Linear(33, 10), n_clusters=k)  # 330 weights: odd packing lengths
    bits = {3: 2, 4: 2, 16: 4, 32: 8, 256: 8}[k]
    info = layer.size_info()
    assert info == {"params": 330 + 10, "bytes": math.ceil(330 * bits / 8) + 4 * k + 4 * 10,
                    "nonzeros": int(layer.dequantize_weight().count_nonzero()) + 10}
    assert info["bytes"] == sum(t.numel() * t.element_size() for t in layer.state_dict().values())


def test_sparse_layout_stores_a_mask_and_only_the_nonzero_indices():
    dense = nn.Linear(40, 20)
    pruned = prune_in_place(dense, 0.75)
    layer = ClusteredLinear.from_linear(dense, n_clusters=16, preserve_sparsity=True)
    nonzero = int((~pruned).sum())
    assert layer.uses_sparse_layout()
    assert set(layer.state_dict()) == {"centroids", "bias", "packed_mask", "packed_indices"}
    assert layer.size_info()["bytes"] == math.ceil(800 / 8) + math.ceil(nonzero * 4 / 8) + 4 * 16 + 4 * 20
    assert layer.size_info()["bytes"] == sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    barely = nn.Linear(40, 20)
    prune_in_place(barely, 0.1)  # 10% zeros: a mask costs more than it saves
    dense_layout = ClusteredLinear.from_linear(barely, n_clusters=16, preserve_sparsity=True)
    assert dense_layout.zero_index is not None and not dense_layout.uses_sparse_layout()
    assert dense_layout.size_info()["bytes"] == 800 * 4 // 8 + 4 * 16 + 4 * 20


def test_mask_packing_round_trips_odd_lengths():
    mask = torch.rand(37) > 0.5
    packed = pack_mask(mask)
    assert packed.shape == (5,) and packed.dtype == torch.uint8
    assert torch.equal(unpack_mask(packed, 37), mask)
    assert pack_mask(torch.tensor([True] + [False] * 7)).item() == 128  # the first flag in the high bit


def test_save_and_load_give_identical_logits(tmp_path):
    model = tiny_model()
    for layer in (model.layers[0].ff.linear1, model.layers[1].attn.q_proj, model.bigram_embedding):
        prune_in_place(layer, 0.8)  # sparse layouts next to dense ones
    cluster_weights(model, n_clusters=16, preserve_sparsity=True, skip=["layers.1.ff"])
    ids, labels = batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):  # trained centroids, not only fresh ones
        optimizer.zero_grad()
        F.cross_entropy(model(ids), labels).backward()
        optimizer.step()
    model.eval()
    save_clustered(model, tmp_path / "model.safetensors")
    loaded = load_clustered(tiny_model(), tmp_path / "model.safetensors").eval()
    assert torch.equal(loaded(ids), model(ids))
    assert isinstance(loaded.layers[1].ff.linear1, nn.Linear)  # skipped layers load as they were
    assert loaded.layers[0].ff.linear1.uses_sparse_layout()
    for name, layer in clustered_layers(loaded).items():
        assert torch.equal(layer.indices, clustered_layers(model)[name].indices), name
    saved = read_safetensors(tmp_path / "model.safetensors")
    for name, layer in clustered_layers(model).items():  # the file holds exactly the bytes size_info counts
        stored = sum(t.numel() * t.element_size() for key, t in saved.items() if key.startswith(name + "."))
        assert stored == layer.size_info()["bytes"], name


def test_loading_refuses_files_that_do_not_fit(tmp_path):
    from tunelab.core.io import write_safetensors
    model = cluster_weights(tiny_model(), n_clusters=4)
    write_safetensors(tmp_path / "plain.safetensors", tiny_model().state_dict())
    with pytest.raises(ValueError, match="not written by save_clustered"):
        load_clustered(tiny_model(), tmp_path / "plain.safetensors")
    state = model.state_dict()
    state["head.packed_indices"] = state["head.packed_indices"][:-1]
    with pytest.raises(RuntimeError, match="head.packed_indices: 32 indices of 2 bits take 8 uint8 bytes, got 7"):
        model.load_state_dict(state)
    del state["head.packed_indices"]
    with pytest.raises(RuntimeError, match="Missing key.*head.packed_indices"):
        model.load_state_dict(state)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(n_clusters=1), ValueError, r"n_clusters must be in \[2, 256\] \(uint8 indices\), got 1"),
    (dict(n_clusters=257), ValueError, r"n_clusters must be in \[2, 256\] \(uint8 indices\), got 257"),
    (dict(n_clusters=8.0), TypeError, "n_clusters must be an int, got float"),
    (dict(init="kmeans_pp"), ValueError, "unknown init 'kmeans_pp'"),
    (dict(skip=["layers.0.ffn", "head"]), ValueError, r"skip names \['layers.0.ffn'\] match no module"),
])
def test_bad_settings_are_refused_by_name(kwargs, error, message):
    with pytest.raises(error, match=message):
        cluster_weights(tiny_model(), **kwargs)


def test_wrong_layer_types_are_refused():
    with pytest.raises(TypeError, match="expected an nn.Linear, got Embedding"):
        ClusteredLinear.from_linear(nn.Embedding(4, 4))
    with pytest.raises(ValueError, match="not max_norm"):
        ClusteredEmbedding.from_embedding(nn.Embedding(4, 4, max_norm=1.0))
    with pytest.raises(ValueError, match="Sequential has no nn.Linear or nn.Embedding layer left to cluster"):
        cluster_weights(nn.Sequential(nn.ReLU()))
