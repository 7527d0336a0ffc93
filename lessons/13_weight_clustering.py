# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Lesson 13 — Weight clustering and deep compression
#
# Uniform quantization (lesson 10) puts the levels of a layer on an even grid; NF4 (lesson 11) puts them
# where a normal distribution has its mass. **Weight clustering** lets the layer's own weights choose:
# k-means finds k values (a *codebook*) and every weight is replaced by the nearest one,
#
#     W[i, j] = c[a[i, j]]        c: (k,) float32 centroids,  a: an index per weight, log2(k) bits
#
# and training afterwards moves the k centroids, not the weights (Han et al. 2016, "Deep Compression",
# https://arxiv.org/abs/1510.00149; TF Model Optimization's `cluster_weights` is the same API):
#
# 1. a codebook by hand on one layer, and what `ClusteredLinear` stores;
# 2. the four ways to start k-means (linear, random, density, k-means++) compared on an embedding table;
# 3. cluster-preserving training: the gradient of a centroid is the sum of its members' gradients, so the
#    codebook moves while the indices stay;
# 4. what bits per weight buy: k = 2 ... 256 on a whole IMDB classifier, embeddings included;
# 5. the deep-compression pipeline, prune -> cluster (zeros kept) -> fine-tune the centroids, as a
#    curve of model bytes against IMDB accuracy; and a clustered model saved and loaded again.
#
# The code used: `tunelab/quant/kmeans.py` (`kmeans_1d`), `tunelab/quant/cluster.py` (`ClusteredLinear`,
# `ClusteredEmbedding`, `cluster_weights`, `save_clustered`), `tunelab/quant/prune.py` (lesson 12) and
# `tunelab/quant/report.py` (`size_report`).

# %%
import copy
import math
import os
import sys
import time
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:  # as a script: write figures to files, no window (a notebook shows them)
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from tunelab.core.classifier import ClassifierConfig, TransformerClassifier
from tunelab.core.collate import ClassificationCollator, LengthBucketSampler
from tunelab.core.data import load_imdb
from tunelab.core.text import build_vocab
from tunelab.core.train import TrainConfig, evaluate, train_model
from tunelab.quant.cluster import (ClusteredLinear, cluster_weights, clustered_layers, index_bits, load_clustered,
                                   save_clustered)
from tunelab.quant.kmeans import INITS, kmeans_1d, kmeans_objective
from tunelab.quant.prune import apply_masks, l1_unstructured, magnitude_prune, make_permanent
from tunelab.quant.report import size_report
from tunelab.tasks.imdb_classification import encode_examples

QUICK = os.environ.get("QUICK", "0") not in ("", "0")
N_TRAIN = 2000 if QUICK else 6000  # train-split reviews for the float model
N_FINETUNE = 300 if QUICK else 2000  # of those, the ones each compressed model is fine-tuned on (one epoch)
N_TEST = 500 if QUICK else 2000  # class-balanced test-split reviews
MAX_LENGTH = 128 if QUICK else 256
EPOCHS = 2 if QUICK else 3
FLOAT_LR = 2e-2 if QUICK else 1e-2  # quick runs, two epochs: test accuracy 0.66 at lr 3e-3, 0.80 at 2e-2
VOCAB_SIZE = 10000 if QUICK else 20000
MODEL = dict(d_model=32, n_heads=2, n_layers=1, d_ff=64, dropout=0.2, bigram_buckets=20000 if QUICK else 100_000,
             token_dropout=0.3)  # the recipe of tunelab/tasks/imdb_classification.py, smaller
CLUSTER_COUNTS = (2, 4, 16, 256)
PIPELINE = [(0.9, 4), (0.97, 4)] if QUICK else [(s, k) for s in (0.5, 0.8, 0.9, 0.95, 0.98) for k in (4, 16)]
CENTROID_LR = 1e-3
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
OUT = Path(os.environ.get("TUNELAB_LESSONS_OUT", HERE / "out"))
OUT.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
torch.set_printoptions(precision=4, sci_mode=False)
start_time = time.time()

# %% [markdown]
# ## 0. A small float classifier to compress
#
# The from-scratch classifier of lesson 02 with hashed bigrams (fastText's trick): one narrow encoder
# layer and two embedding tables. Like most small text models it is almost all embedding, so a
# compression that leaves the embeddings in float32 would barely shrink it; here everything is clustered.

# %%
train_set = load_imdb("train", limit=N_TRAIN, seed=0)
test_set = load_imdb("test", limit=N_TEST, seed=0)
vocab = build_vocab(train_set["text"], min_freq=2, max_size=VOCAB_SIZE)
train_examples, test_examples = (encode_examples(split, vocab, MAX_LENGTH) for split in (train_set, test_set))
finetune_examples = train_examples[:N_FINETUNE]
collate = ClassificationCollator(max_length=MAX_LENGTH, pad_id=vocab["<pad>"])


def bucketed(examples, seed=0):
    return LengthBucketSampler([len(e["input_ids"]) for e in examples], batch_size=32, seed=seed)


def test_accuracy(model) -> float:
    return evaluate(model, test_examples, collate_fn=collate, batch_size=128)["accuracy"]


torch.manual_seed(0)
float_model = TransformerClassifier(ClassifierConfig(vocab_size=len(vocab), max_len=MAX_LENGTH, **MODEL))
train_model(float_model, train_examples, collate_fn=collate, batch_sampler=bucketed(train_examples),
            config=TrainConfig(epochs=EPOCHS, batch_size=32, lr=FLOAT_LR, warmup=0.1, progress=False, plot=False))
float_accuracy = test_accuracy(float_model)
float_bytes = size_report(float_model).bytes
print(f"{len(train_examples)} train reviews, {len(test_examples)} test reviews, vocabulary of {len(vocab)}")
print(size_report(float_model).table())
print(f"float32 model: test accuracy {float_accuracy:.3f}, {float_bytes / 1024:.0f} kB")

# %% [markdown]
# ## 1. A codebook by hand
#
# Take the first feed-forward layer, 64 x 32 = 2,048 weights, and k = 4. `kmeans_1d` runs Lloyd's
# algorithm on the flattened weights: assign each weight to its nearest centroid, move each centroid to the
# mean of its weights, repeat. In one dimension the clusters are intervals cut at the midpoints between
# sorted centroids, so the assignment is a binary search (`searchsorted`) rather than a distance matrix.

# %%
layer = float_model.layers[0].ff.linear1
w = layer.weight.detach()  # (64, 32)
centroids, assignments = kmeans_1d(w, 4, init="kmeans++", generator=torch.Generator().manual_seed(0))
indices = assignments.reshape(w.shape)  # (64, 32) in [0, 4)
rebuilt = centroids[indices]  # (64, 32): every weight replaced by its centroid
print("codebook:", centroids)
print("first weights: ", w[0, :6])
print("their indices: ", indices[0, :6].tolist())
print("rebuilt:       ", rebuilt[0, :6])
clustered = ClusteredLinear.from_linear(layer, n_clusters=4, generator=torch.Generator().manual_seed(0))
by_hand_equal = torch.equal(clustered.dequantize_weight(), rebuilt)
print(f"ClusteredLinear holds the same c[a]: {by_hand_equal}; relative error "
      f"{((rebuilt - w).norm() / w.norm()).item():.3f}")
info = clustered.size_info()
print(f"stored: {w.numel()} indices x {index_bits(4)} bits = {w.numel() * 2 // 8} B, + codebook 4 x 4 B, "
      f"+ bias {layer.bias.numel()} x 4 B = {info['bytes']} B, against {4 * (w.numel() + 64)} B in float32")

# %% [markdown]
# ## 2. Where k-means starts
#
# Lloyd's algorithm only finds a local optimum, and in one dimension it moves slowly: a centroid can
# only take weights from its two neighbours. So the start matters. TF Model Optimization offers
# *linear* (evenly spaced between min and max), *random* and *density-based* (quantiles of the CDF);
# *k-means++* (Arthur & Vassilvitskii 2007) picks each new centroid with probability proportional to its
# squared distance from the nearest one already picked. We measure the objective — the mean squared
# distance of a weight to its centroid — after 0, 1, 3, 10 and 30 iterations on the token embedding table.

# %%
table = float_model.token_embedding.weight.detach()
K_INIT, ITERATIONS = 16, (0, 1, 3, 10, 30)
objective = {}
final_codebooks = {}
for init in INITS:
    for iters in ITERATIONS:
        c, a = kmeans_1d(table, K_INIT, init=init, iters=iters, generator=torch.Generator().manual_seed(0))
        objective[init, iters] = kmeans_objective(table, c, a) / table.numel()
    final_codebooks[init] = c
print(f"mean squared error per weight (x 1e-5), k = {K_INIT}, {table.numel():,} weights (std {table.std():.3f})")
print(f"{'init':<10}" + "".join(f"{f'{i} iters':>11}" for i in ITERATIONS))
for init in INITS:
    print(f"{init:<10}" + "".join(f"{objective[init, i] * 1e5:>11.3f}" for i in ITERATIONS))
kpp_vs_linear = objective["kmeans++", 30] / objective["linear", 30]
print(f"after 30 iterations k-means++ reaches {kpp_vs_linear:.2f}x the error of the linear start")

# %% [markdown]
# The linear start spends centroids on the tails, where a trained table has few weights, and
# Lloyd's algorithm needs many iterations to pull them into the crowded middle. The density start is the
# opposite extreme (every cluster gets the same number of weights, which starves the tails). k-means++
# lands in between and is `cluster_weights`' default. The figure puts each codebook on the histogram.

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
left.hist(table.flatten().numpy(), bins=200, color="lightgray")
top = left.get_ylim()[1]
for row, init in enumerate(INITS):
    y = top * (0.95 - 0.1 * row)
    left.plot(final_codebooks[init].numpy(), [y] * K_INIT, "|", markersize=14, mew=2, label=init)
left.set(xlabel="weight value", ylabel="count", title=f"Token embedding: {K_INIT} centroids after 30 iterations")
left.legend(fontsize=8)
for init in INITS:
    right.plot([max(i, 0.5) for i in ITERATIONS], [objective[init, i] for i in ITERATIONS], "o-", label=init)
right.set(xscale="log", yscale="log", xlabel="Lloyd iterations (0 plotted at 0.5)",
          ylabel="mean squared error per weight", title="The objective from each start")
right.legend(fontsize=8)
fig.tight_layout()
fig.savefig(OUT / "13_codebooks.png", dpi=100)

# %% [markdown]
# ## 3. Cluster-preserving training
#
# `cluster_weights` swaps every `nn.Linear` and `nn.Embedding` for its clustered form. The forward pass
# gathers `centroids[indices]`, so backpropagation sums the gradient of every weight in a cluster into its
# centroid: dL/dc_m = sum over a(ij) = m of dL/dW_ij. We check this against autograd on a free dense weight,
# then fine-tune the k = 16 model for one epoch: only the codebooks (16 numbers per layer) and the biases train.

# %%
def clustered_copy(model, n_clusters, **options):
    return cluster_weights(copy.deepcopy(model), n_clusters=n_clusters,
                           generator=torch.Generator().manual_seed(0), **options)


def finetune_centroids(model, lr=CENTROID_LR, after_step=None):
    train_model(model, finetune_examples, collate_fn=collate, batch_sampler=bucketed(finetune_examples, seed=1),
                after_step=after_step, config=TrainConfig(epochs=1, batch_size=32, lr=lr, warmup=0.1,
                                                          progress=False, plot=False))
    return model.eval()


model16 = clustered_copy(float_model, 16).eval()  # eval: no dropout, so both passes compute the same loss
batch = collate(test_examples[:8])
probe = model16.layers[0].attn.q_proj
loss = F.cross_entropy(model16(batch["input_ids"], batch["attention_mask"]), batch["labels"])
dense_weight = probe.dequantize_weight().detach().requires_grad_()
weight_grad = torch.autograd.grad(loss, [probe.centroids], retain_graph=True)[0]
probe_original = probe.forward
probe.forward = lambda x: F.linear(x, dense_weight, probe.bias)  # the same function, of a free dense weight
dense_loss = F.cross_entropy(model16(batch["input_ids"], batch["attention_mask"]), batch["labels"])
member_grads = torch.autograd.grad(dense_loss, [dense_weight])[0]
probe.forward = probe_original
summed = torch.zeros(16).index_add_(0, probe.indices.flatten().long(), member_grads.flatten())
centroid_grad_diff = (weight_grad - summed).abs().max().item()
print(f"q_proj: centroid gradient vs sum of its members' gradients: max difference {centroid_grad_diff:.1e}")

trainable = sorted({name.rsplit(".", 1)[-1] for name, p in model16.named_parameters() if p.requires_grad
                    and name.rsplit(".", 1)[0] in clustered_layers(model16)})
indices_before = {name: m.indices.clone() for name, m in clustered_layers(model16).items()}
codebook_before = model16.token_embedding.centroids.detach().clone()
k16_before = test_accuracy(model16)
finetune_centroids(model16)
k16_after = test_accuracy(model16)
indices_unchanged = all(torch.equal(m.indices, indices_before[n]) for n, m in clustered_layers(model16).items())
max_distinct = max(m.dequantize_weight().unique().numel() for m in clustered_layers(model16).values())
print(f"parameters that train in the clustered layers: {trainable}")
print(f"token embedding codebook before: {codebook_before[:6]} ...")
print(f"                         after:  {model16.token_embedding.centroids.detach()[:6]} ...")
print(f"indices unchanged: {indices_unchanged}; most distinct values in a layer: {max_distinct}")
print(f"k = 16: test accuracy {k16_before:.3f} right after clustering, {k16_after:.3f} after one epoch on "
      f"{len(finetune_examples)} reviews (float model: {float_accuracy:.3f})")

# %% [markdown]
# ## 4. What bits per weight buy
#
# Each index takes ceil(log2 k) bits, stored as 2, 4 or 8 so that whole indices fit in a byte (k = 2 still
# costs 2 bits here); every layer adds its k float32 centroids, and biases and LayerNorms stay float32.
# Below, the whole model at each k: bytes from `size_report` (it asks each clustered layer's `size_info`),
# accuracy right after clustering and after one epoch of centroid training.

# %%
by_k = {}
for k in CLUSTER_COUNTS:
    if k == 16:  # section 3 trained this one already
        model, before, after = model16, k16_before, k16_after
    else:
        model = clustered_copy(float_model, k)
        before = test_accuracy(model)
        after = test_accuracy(finetune_centroids(model))
    report = size_report(model)
    by_k[k] = dict(bits=index_bits(k), bytes=report.bytes, bits_per_param=report.bits_per_param, before=before,
                   after=after)
print(f"{'k':>5}{'index bits':>12}{'bits/param':>12}{'kB':>9}{'smaller':>9}{'acc clustered':>15}"
      f"{'acc fine-tuned':>16}")
print(f"{'float':>5}{32:>12}{32:>12.2f}{float_bytes / 1024:>9.1f}{1:>8.1f}x{float_accuracy:>15.3f}{'':>16}")
for k, r in by_k.items():
    print(f"{k:>5}{r['bits']:>12}{r['bits_per_param']:>12.2f}{r['bytes'] / 1024:>9.1f}"
          f"{float_bytes / r['bytes']:>8.1f}x{r['before']:>15.3f}{r['after']:>16.3f}")

# %% [markdown]
# Read the table from the bottom up. From 256 down to 16 centroids per layer, clustering costs nothing
# measurable, and the fine-tuning epoch moves the accuracy by less than the noise of a few hundred test
# reviews (about 2 points); going from 16 to 256 only doubles the bytes. k = 4 and k = 2 cost the same bytes
# (both indices are stored at 2 bits), but two values per layer (near-binary weights) lose several points
# right after clustering, and training the two centroids of each layer wins back a good part of them:
# this is where cluster-preserving training earns its keep.
#
# ## 5. Deep compression: prune, cluster, fine-tune
#
# Han et al. first prune (most weights are set to exactly zero and the rest retrained), then cluster what
# is left, then fine-tune the centroids. With `preserve_sparsity=True` the zeros get a centroid of their own,
# pinned at 0 (it receives no gradient), so pruned weights stay pruned through the fine-tuning. A layer
# that is sparse enough is then stored as a 1-bit mask plus the indices of its non-zero weights only:
# bits per weight = 1 + density x index bits. Embeddings are pruned too (`l1_unstructured` on each table).

# %%
def pruned_copy(model, sparsity):
    pruned = copy.deepcopy(model)
    magnitude_prune(pruned, sparsity)  # every nn.Linear but the head
    for table_module in (pruned.token_embedding, pruned.bigram_embedding):
        l1_unstructured(table_module, "weight", sparsity)
    finetune_centroids(pruned, lr=1e-3, after_step=lambda step: apply_masks(pruned))  # masked retraining
    return make_permanent(pruned)


def sparse_float_bytes(model):
    """A pruned float32 model stored as a 1-bit mask + its non-zero values (the fair float baseline)."""
    report = size_report(model)
    return sum(r.bytes if r.nonzeros == r.params else math.ceil(r.params / 8) + 4 * r.nonzeros for r in report.rows)


pipeline = []
pruned_cache = {}
for sparsity, k in PIPELINE:
    if sparsity not in pruned_cache:
        pruned = pruned_cache[sparsity] = pruned_copy(float_model, sparsity)
        pruned_cache[sparsity, "accuracy"] = test_accuracy(pruned)
    pruned = pruned_cache[sparsity]
    model = clustered_copy(pruned, k, preserve_sparsity=True)
    before = test_accuracy(model)
    after = test_accuracy(finetune_centroids(model))
    report = size_report(model)
    zeros_kept = all(torch.equal(m.dequantize_weight() == 0, pruned.get_submodule(n).weight == 0)
                     for n, m in clustered_layers(model).items())
    pipeline.append(dict(sparsity=sparsity, k=k, bytes=report.bytes, before=before, after=after,
                         zeros_kept=zeros_kept, pruned_bytes=sparse_float_bytes(pruned),
                         pruned_accuracy=pruned_cache[sparsity, "accuracy"]))
print(f"{'sparsity':>9}{'k':>5}{'pruned kB':>11}{'acc pruned':>12}{'kB':>8}{'smaller':>9}{'acc clustered':>15}"
      f"{'acc fine-tuned':>16}{'zeros kept':>12}")
for r in pipeline:
    print(f"{r['sparsity']:>9.2f}{r['k']:>5}{r['pruned_bytes'] / 1024:>11.1f}{r['pruned_accuracy']:>12.3f}"
          f"{r['bytes'] / 1024:>8.1f}{float_bytes / r['bytes']:>8.1f}x{r['before']:>15.3f}{r['after']:>16.3f}"
          f"{str(r['zeros_kept']):>12}")
smallest = min(pipeline, key=lambda r: r["bytes"])

# %% [markdown]
# Pruning alone (stored as mask + float32 values) and clustering alone each shrink the model several times;
# together they multiply, and the embedding tables of this small model lose most of their weights before the
# accuracy moves. Past that point the 1-bit mask is the floor: it costs one bit per weight whatever the
# sparsity, so at 97% it is most of the file. Han et al. store the gaps between non-zeros instead (4-bit
# relative indices) and Huffman-code the indices, which wins once fewer than about a quarter of the weights
# survive. The figure puts every model on one curve of bytes against accuracy.

# %%
fig, ax = plt.subplots(figsize=(8, 5))
ax.plot([float_bytes], [float_accuracy], "k*", markersize=12, label="float32")
ax.plot([by_k[k]["bytes"] for k in CLUSTER_COUNTS], [by_k[k]["after"] for k in CLUSTER_COUNTS], "o-",
        label="cluster only (k = 2, 4, 16, 256)")
for k in CLUSTER_COUNTS:
    ax.annotate(f"k={k}", (by_k[k]["bytes"], by_k[k]["after"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
seen = sorted({r["sparsity"] for r in pipeline})
ax.plot([next(r["pruned_bytes"] for r in pipeline if r["sparsity"] == s) for s in seen],
        [pruned_cache[s, "accuracy"] for s in seen], "s--", label="prune only (mask + float32)")
ax.plot([r["bytes"] for r in pipeline], [r["after"] for r in pipeline], "D", label="prune -> cluster -> fine-tune")
for r in pipeline:
    ax.annotate(f"{r['sparsity']:.0%}, k={r['k']}", (r["bytes"], r["after"]), textcoords="offset points",
                xytext=(4, -10), fontsize=8)
ax.set(xscale="log", xlabel="model bytes (log scale)",
       ylabel=f"test accuracy ({len(test_examples)} reviews; chance 0.5)",
       title="Deep compression of an IMDB classifier")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(OUT / "13_deep_compression.png", dpi=100)

# %% [markdown]
# ## 6. Saving a clustered model
#
# A clustered layer's `state_dict` holds its packed form (`centroids`, `bias`, and `packed_indices`, or
# `packed_mask` + `packed_indices` of the non-zeros), so `save_clustered` is one safetensors file: the state
# dict, plus the layout of the clustered layers in the header. `load_clustered` takes a freshly built float
# model, swaps in empty clustered layers as the header says, and loads the tensors.

# %%
smallest_model = clustered_copy(pruned_cache[smallest["sparsity"]], smallest["k"], preserve_sparsity=True).eval()
save_clustered(smallest_model, OUT / "13_clustered.safetensors")
fresh = TransformerClassifier(ClassifierConfig(vocab_size=len(vocab), max_len=MAX_LENGTH, **MODEL))
loaded = load_clustered(fresh, OUT / "13_clustered.safetensors").eval()
with torch.no_grad():
    roundtrip_equal = torch.equal(loaded(batch["input_ids"], batch["attention_mask"]),
                                  smallest_model(batch["input_ids"], batch["attention_mask"]))
file_kb = (OUT / "13_clustered.safetensors").stat().st_size / 1024
print(f"file: {file_kb:.1f} kB (size_report: {size_report(smallest_model).bytes / 1024:.1f} kB, the rest is the "
      f"header: tensor names and the layout); reloaded logits identical: {roundtrip_equal}")

# %% [markdown]
# ## What to remember
#
# * A clustered layer is k float32 centroids and one log2(k)-bit index per weight; k-means puts the
#   centroids where the weights are, and k-means++ starts it best.
# * The forward gathers c[a], so training moves the codebook (gradients of a cluster's members add up) while
#   the indices, and so the sharing pattern, never change.
# * Sixteen centroids per layer (4 bits) kept this classifier's accuracy; embeddings must be clustered too,
#   or they dominate the bytes.
# * Pruning first and clustering with the zeros pinned multiply the savings: 1 bit of mask per weight plus
#   a few bits per surviving weight.

# %%
print(f"quick={QUICK} seconds={time.time() - start_time:.0f}")
print(f"RESULT: float_accuracy={float_accuracy:.4f} float_kb={float_bytes / 1024:.1f} by_hand_equal={by_hand_equal} "
      f"kpp_vs_linear={kpp_vs_linear:.3f} centroid_grad_diff={centroid_grad_diff:.2e} "
      f"indices_unchanged={indices_unchanged} max_distinct={max_distinct} k16_before={k16_before:.4f} "
      f"k16_after={k16_after:.4f} k2_before={by_k[2]['before']:.4f} k2_after={by_k[2]['after']:.4f} "
      f"k16_kb={by_k[16]['bytes'] / 1024:.1f} k256_kb={by_k[256]['bytes'] / 1024:.1f} "
      f"k256_after={by_k[256]['after']:.4f} deep_kb={smallest['bytes'] / 1024:.1f} "
      f"deep_sparsity={smallest['sparsity']} deep_k={smallest['k']} deep_accuracy={smallest['after']:.4f} "
      f"deep_ratio={float_bytes / smallest['bytes']:.1f} zeros_kept={all(r['zeros_kept'] for r in pipeline)} "
      f"roundtrip_equal={roundtrip_equal}")
