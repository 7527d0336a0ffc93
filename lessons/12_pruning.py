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
# # Lesson 12 — Pruning: removing the weights that matter least
#
# Lessons 10 and 11 stored every weight in fewer bits. Pruning stores *fewer weights*: it sets most of
# them to zero and keeps a binary mask M, so that the layer computes with W * M (Han et al. 2015,
# https://arxiv.org/abs/1506.02626). Which weights, and how many, is the whole question:
#
# 1. a mask by hand on one layer, checked against `torch.nn.utils.prune`; why the mask must be re-applied
#    after every optimizer step;
# 2. a small classifier trained from scratch on IMDB, then pruned in one shot: by magnitude or at random,
#    each layer alike or all layers ranked together (global);
# 3. global pruning on MiniLM's real weights: which layers it empties first;
# 4. structured pruning: whole attention heads and feed-forward neurons instead of single weights;
# 5. pruning during training, on the cubic schedule of Zhu & Gupta 2017, against one shot then training;
# 6. what actually gets faster: a matrix with 90% zeros is not; a model with heads and neurons removed is.
#
# The code used: `tunelab/quant/prune.py` (`l1_unstructured`, `magnitude_prune`, `GradualPruner`,
# `prune_heads`, `prune_neurons`, `shrink_structure`, `apply_structure`) and `tunelab/core/train.py`
# (`train_model`, whose `after_step` callback re-applies the masks).

# %%
import copy
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:  # as a script: write figures to files, no window (a notebook shows them)
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from tunelab.core.classifier import ClassifierConfig, TransformerClassifier
from tunelab.core.collate import ClassificationCollator, LengthBucketSampler
from tunelab.core.data import load_imdb
from tunelab.core.hub import load_pretrained
from tunelab.core.text import build_vocab
from tunelab.core.train import TrainConfig, evaluate, train_model
from tunelab.quant.prune import (GradualPruner, apply_masks, apply_structure, cubic_sparsity, encoder_layers,
                                 l1_unstructured, magnitude_prune, make_permanent, prunable_modules, prune_heads,
                                 prune_neurons, random_unstructured, shrink_structure, sparsity_report)
from tunelab.tasks.imdb_classification import encode_examples

QUICK = os.environ.get("QUICK", "0") not in ("", "0")
N_TRAIN = 2500 if QUICK else 10000  # train-split reviews
N_TEST = 500 if QUICK else 2000  # test-split reviews
MAX_LENGTH = 96 if QUICK else 256  # basic_english tokens per review (head+tail truncation)
MODEL = dict(d_model=32, n_heads=4, n_layers=2, d_ff=64) if QUICK else dict(d_model=64, n_heads=4, n_layers=2,
                                                                             d_ff=256)
EPOCHS = 1 if QUICK else 2  # the first part of training, then one more epoch dense, one-shot or gradual
LR = 3e-3
ONE_SHOT = (0.5, 0.8, 0.9, 0.95, 0.98) if QUICK else (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
TARGET = 0.9  # the sparsity of the fine-tuning comparison
WEIGHTS = (nn.Linear, nn.Embedding)  # what the classifier's pruning acts on: every weight matrix but the head
TIMING_BATCH = (4, 128) if QUICK else (16, 256)  # (B, T) for the speed measurements
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
OUT = Path(os.environ.get("TUNELAB_LESSONS_OUT", HERE / "out"))
OUT.mkdir(parents=True, exist_ok=True)
torch.set_printoptions(precision=2, sci_mode=False)

# %% [markdown]
# ## 1. A mask by hand on one layer
#
# Magnitude pruning at 50% keeps the half of the weights with the largest |w|: find the k-th smallest
# magnitude (k = round(0.5 x 24) = 12 of a 4 x 6 weight) and keep what lies above it. `l1_unstructured`
# does the same and stores the mask as a buffer `weight_mask` next to the weight, which it multiplies in
# place: the optimizer and the state dict keep seeing a plain `weight`. PyTorch's own
# `torch.nn.utils.prune.l1_unstructured` picks the same entries (it re-parametrises the layer instead).

# %%
torch.manual_seed(0)
layer = nn.Linear(6, 4)
original = copy.deepcopy(layer)
w = layer.weight.detach().clone()
k = round(0.5 * w.numel())
threshold = w.abs().flatten().kthvalue(k).values
by_hand = w.abs() > threshold  # (4, 6) True = kept
l1_unstructured(layer, "weight", amount=0.5)
torch_prune.l1_unstructured(original, "weight", amount=0.5)
mask_by_hand = torch.equal(layer.weight_mask, by_hand)
mask_matches_torch = torch.equal(layer.weight_mask, original.weight_mask.bool())
print("weight:\n", w)
print(f"threshold |w| = {threshold:.3f}; mask (1 = kept):\n", layer.weight_mask.int())
print(f"mask == by hand: {mask_by_hand}; mask == torch.nn.utils.prune's: {mask_matches_torch}; "
      f"state dict: {list(layer.state_dict())}")

# %% [markdown]
# A second call prunes among the survivors only (as torch's `PruningContainer` does): 50% again takes 6 of
# the 12 left, not 12 of 24. Then one AdamW step: the gradient and the weight decay move the pruned weights
# off zero, and `apply_masks` puts them back. In training that is the `after_step` callback of `train_model`.

# %%
l1_unstructured(layer, "weight", amount=0.5)
print(f"after a second 50%: {int((~layer.weight_mask).sum())} of {w.numel()} pruned")
optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1)
layer(torch.randn(8, 6)).square().sum().backward()
optimizer.step()
revived = int((layer.weight[~layer.weight_mask] != 0).sum())
apply_masks(layer)
revived_after_apply = int((layer.weight[~layer.weight_mask] != 0).sum())
print(f"pruned weights that one AdamW step moved off zero: {revived}; after apply_masks: {revived_after_apply}")

# %% [markdown]
# ## 2. One-shot pruning of a small classifier
#
# The model is lesson 02's transformer classifier, trained from scratch on an IMDB subset, in two parts:
# `EPOCHS` epochs, a copy kept (section 5 starts from it), then one more epoch. Most of its weights are the
# token embedding table; we prune every weight matrix except the output layer (`head`): the embedding and
# the eight Linear layers. Three ways to choose the zeros, all in one shot, without training afterwards:
#
# * **magnitude, layer-wise**: the same fraction of every matrix, the smallest |w| of each;
# * **magnitude, global**: the smallest |w| of all matrices ranked together, so a matrix of small weights
#   loses more;
# * **random**: the same fraction of every matrix, chosen at random (the control).

# %%
train_set = load_imdb("train", limit=N_TRAIN, seed=0)
test_set = load_imdb("test", limit=N_TEST, seed=0)
vocab = build_vocab(train_set["text"], min_freq=2, max_size=8000 if QUICK else 20000)
train_examples, test_examples = (encode_examples(split, vocab, MAX_LENGTH) for split in (train_set, test_set))
collate = ClassificationCollator(max_length=MAX_LENGTH, pad_id=vocab["<pad>"])
sampler = LengthBucketSampler([len(e["input_ids"]) for e in train_examples], batch_size=32, seed=0)


def fit(model, epochs, lr, after_step=None):
    config = TrainConfig(epochs=epochs, batch_size=32, lr=lr, warmup=0.1, weight_decay=0.01, progress=False,
                         plot=False)
    return train_model(model, train_examples, collate_fn=collate, config=config, batch_sampler=sampler,
                       after_step=after_step)


def accuracy(model):
    return evaluate(model, test_examples, collate_fn=collate, batch_size=200)["accuracy"]


torch.manual_seed(0)
dense = TransformerClassifier(ClassifierConfig(vocab_size=len(vocab), max_len=MAX_LENGTH, dropout=0.1, **MODEL))
fit(dense, EPOCHS, LR)
halfway = copy.deepcopy(dense)  # where section 5's runs start
halfway_acc = accuracy(halfway)
fit(dense, 1, LR)
dense_acc = accuracy(dense)
n_pruned_weights = sum(m.weight.numel() for _, m in prunable_modules(dense, kinds=WEIGHTS))
print(f"dense model: test accuracy {halfway_acc:.3f} after {EPOCHS} epoch(s), {dense_acc:.3f} after one more, on "
      f"{len(test_examples)} reviews; "
      f"{n_pruned_weights:,} weights in the pruned matrices")


def pruned_copy(model, sparsity, how):
    pruned = copy.deepcopy(model)
    if how == "random":
        generator = torch.Generator().manual_seed(0)
        for _, module in prunable_modules(pruned, kinds=WEIGHTS):
            random_unstructured(module, "weight", sparsity, generator=generator)
    else:
        magnitude_prune(pruned, sparsity, scope=how, kinds=WEIGHTS)
    return pruned


one_shot = {how: [accuracy(pruned_copy(dense, s, how)) for s in ONE_SHOT] for how in ("layer", "global", "random")}
print(f"{'sparsity':>8}  {'magnitude, layer':>16}  {'magnitude, global':>17}  {'random':>6}")
for i, s in enumerate(ONE_SHOT):
    print(f"{s:>8.0%}  {one_shot['layer'][i]:>16.3f}  {one_shot['global'][i]:>17.3f}  {one_shot['random'][i]:>6.3f}")
at_target = ONE_SHOT.index(TARGET)

# %% [markdown]
# Magnitude beats random at high sparsity: a small weight changes the output little when it goes, a
# random one may be large. Layer-wise and global ranking differ in where the zeros go: global takes more
# from matrices whose weights are small, which is not always where they matter least. With a test set of
# this size, differences of two or three points are within the noise.
#
# ## 3. Global pruning on MiniLM's real weights
#
# Which layers does global pruning hit hardest? On MiniLM (22.7M weights, 6 layers) we rank the weights of all
# 36 encoder Linear layers together, prune 50% of them, and read each layer's share of zeros with
# `sparsity_report`.

# %%
minilm, tokenizer = load_pretrained("minilm")
reference = copy.deepcopy(minilm)
magnitude_prune(minilm, 0.5, scope="global", skip=("pooler",))
layer_sparsity = {name.removesuffix(".weight"): s for name, s in sparsity_report(minilm).layer_sparsity().items()
                  if name.startswith("layers.")}
kinds = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "ff.linear1", "ff.linear2"]
grid = np.array([[layer_sparsity[f"layers.{i}.{kind}"] for kind in kinds] for i in range(6)])  # (6 layers, 6)
ranked = sorted(layer_sparsity.items(), key=lambda item: -item[1])
print("hardest hit:", ", ".join(f"{n} {s:.0%}" for n, s in ranked[:3]))
print("least hit:  ", ", ".join(f"{n} {s:.0%}" for n, s in ranked[-3:]))
by_kind = {kind: grid[:, j].mean() for j, kind in enumerate(kinds)}
print("mean sparsity per kind of matrix:", ", ".join(f"{k} {v:.0%}" for k, v in by_kind.items()))
minilm_sparsity_min, minilm_sparsity_max = grid.min(), grid.max()

fig, ax = plt.subplots(figsize=(8, 4.5))
image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1)
for i in range(6):
    for j in range(len(kinds)):
        ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center", color="white" if grid[i, j] < 0.6 else "black")
ax.set(xticks=range(len(kinds)), xticklabels=kinds, yticks=range(6), yticklabels=[f"layer {i}" for i in range(6)],
       title="MiniLM, 50% global pruning: sparsity of each matrix")
plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
fig.colorbar(image, ax=ax, label="fraction pruned")
fig.tight_layout()
fig.savefig(OUT / "12_global_layer_sparsity.png", dpi=100)

# %% [markdown]
# The ranking is by absolute size, so a matrix whose weights are small everywhere is emptied first: the
# figure shows where MiniLM's smallest weights live. Layer-wise pruning would put 50% in every cell, global
# pruning lets the network's own scale decide. (That is also its risk: a layer pruned to almost nothing
# cuts the model in two, which is why some recipes cap each layer's share. Ranking the word embeddings
# together with the Linear layers is worse still: their magnitudes live on another scale, and in
# `benchmarks/imdb_compression.py` a fine-tuned MiniLM pruned 60% globally, embeddings included, fell to
# chance; pruned per layer and per table it kept 82.9% at 50% in one shot and 84.2% pruned gradually while
# fine-tuning, against 85.7% unpruned.)
#
# ## 4. Structured pruning: heads and neurons
#
# Unstructured zeros are scattered; the matrices keep their shapes. Structured pruning removes whole units:
#
# * an **attention head** h (Michel et al. 2019, "Are Sixteen Heads Really Better than One?"), scored by
#   ||W_V^h|| x ||W_O^h||, the norms of its value rows and its output columns: the head adds
#   A (x W_V^h) W_O^h to the residual stream, with attention rows A that sum to 1, so this bounds its size;
# * a **feed-forward neuron** j, scored by ||row j of linear1|| x ||column j of linear2||.
#
# `prune_heads` and `prune_neurons` mask the lowest-scoring ones; `shrink_structure` then removes them,
# which is exact (a head whose output columns are zero adds nothing). Here half of the heads and half of
# the neurons go, against unstructured magnitude pruning of the same fraction of the encoder layers.

# %%
structured = copy.deepcopy(dense)
prune_heads(structured, 0.5)
prune_neurons(structured, 0.5)
encoder_names = [f"{name}.weight" for name, m in structured.named_modules()
                 if isinstance(m, nn.Linear) and name.startswith("layers.")]
report = sparsity_report(structured)
structured_fraction = sum(report.layers[n][0] for n in encoder_names) / sum(report.layers[n][1] for n in encoder_names)
unstructured = copy.deepcopy(dense)
for name, module in prunable_modules(unstructured, skip=("head",)):
    l1_unstructured(module, "weight", structured_fraction)
structured_acc, unstructured_acc = accuracy(structured), accuracy(unstructured)
print(f"{structured_fraction:.0%} of the encoder layers' weights removed: heads + neurons -> accuracy "
      f"{structured_acc:.3f}; single weights -> {unstructured_acc:.3f} (dense {dense_acc:.3f})")


def sentence_embeddings(model, texts):
    """MiniLM's sentence vectors: the mean of the last hidden states over the real tokens."""
    encoded = [tokenizer.encode(text)[:128] for text in texts]
    T = max(len(ids) for ids in encoded)
    ids = torch.tensor([e + [tokenizer.pad_id] * (T - len(e)) for e in encoded])
    mask = (ids != tokenizer.pad_id).long()
    with torch.no_grad():
        hidden = model(ids, mask).last_hidden_state  # (B, T, C)
    return (hidden * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True)  # (B, C)


texts = list(load_imdb("test", limit=8, seed=1)["text"])
minilm_dense = sentence_embeddings(reference, texts)
minilm_structured = copy.deepcopy(reference)
prune_heads(minilm_structured, 0.5)
prune_neurons(minilm_structured, 0.5)
minilm_unstructured = copy.deepcopy(reference)
magnitude_prune(minilm_unstructured, 0.5, skip=("pooler",))
cos = {name: nn.functional.cosine_similarity(sentence_embeddings(m, texts), minilm_dense).mean().item()
       for name, m in (("structured", minilm_structured), ("unstructured", minilm_unstructured))}
print(f"MiniLM with 50% of its encoder weights gone: cosine to the dense sentence vectors "
      f"{cos['structured']:.3f} (heads + neurons), {cos['unstructured']:.3f} (single weights)")

# %% [markdown]
# In the small classifier the residual stream carries the word vectors around both encoder layers, so
# removing half of their weights either way changes the accuracy little. MiniLM depends on its layers:
# at the same count, its sentence vectors move much further when whole heads and neurons go than when
# single weights go, because unstructured pruning keeps the large weights of every head and neuron.
# Structured pruning pays for its coarseness with speed (section 6).
#
# ## 5. Pruning while fine-tuning: one shot vs gradual
#
# Now the last epoch of training is spent three ways, all from the copy kept after the first part: dense
# (the model of section 2), pruned to 90% in one shot and then trained around the fixed mask, or pruned
# gradually. Zhu & Gupta 2017 (https://arxiv.org/abs/1710.01878) raise the sparsity during training, every
# dt steps, on a cubic schedule that prunes fast while there are many redundant weights and slowly near the end:
#
#     s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3,    t = t0, t0 + dt, ..., t0 + n dt
#
# `GradualPruner` is an `after_step` callback: at each event it prunes up to round(s_t x numel) zeros and
# every step it re-applies the masks. Both pruned runs get the same steps and learning rate as the dense
# one; the gradual one reaches 90% two thirds of the way through and trains the rest at the final sparsity.

# %%
steps = len(list(sampler))
n_events = 8
interval = max(1, (2 * steps // 3) // n_events)
one_shot_ft = pruned_copy(halfway, TARGET, "global")
oneshot_acc = accuracy(one_shot_ft)
fit(one_shot_ft, 1, LR, after_step=lambda step: apply_masks(one_shot_ft))
oneshot_ft_acc = accuracy(one_shot_ft)

gradual = copy.deepcopy(halfway)
pruner = GradualPruner(gradual, TARGET, start_step=0, n_steps=n_events, interval=interval, scope="global",
                       kinds=WEIGHTS)
measured = []


def prune_and_record(step):
    pruner(step)
    measured.append(sparsity_report(gradual).sparsity)


fit(gradual, 1, LR, after_step=prune_and_record)
gradual_acc = accuracy(gradual)
gradual_report = sparsity_report(gradual)
pruned_now = sum(int((~m.weight_mask).sum()) for m in pruner.modules)
gradual_exact = pruned_now == round(TARGET * sum(m.weight.numel() for m in pruner.modules))
print(f"{steps} training steps; events every {interval} steps, the last at step {pruner.end_step}")
print(f"at {TARGET:.0%}: one shot, no training {oneshot_acc:.3f}; one shot + training {oneshot_ft_acc:.3f}; "
      f"gradual {gradual_acc:.3f} (dense {dense_acc:.3f})")
print(f"gradual run ends with exactly round({TARGET} x numel) weights pruned: {gradual_exact}")

fig, ax = plt.subplots(figsize=(7, 5))
for how, label, style in (("layer", "magnitude, layer-wise", "o-"), ("global", "magnitude, global", "s-"),
                          ("random", "random", "x--")):
    ax.plot(ONE_SHOT, one_shot[how], style, label=f"one shot: {label}")
ax.plot([TARGET], [oneshot_ft_acc], "D", markersize=9, label="one shot (global) + the last epoch")
ax.plot([TARGET], [gradual_acc], "*", markersize=13, label="gradual (cubic) during the last epoch")
ax.axhline(dense_acc, color="black", linewidth=1, label="dense")
ax.axhline(0.5, color="gray", linestyle="--", label="chance")
ax.set(xlabel="sparsity of the pruned matrices", ylabel=f"test accuracy ({len(test_examples)} reviews)",
       title="Accuracy vs sparsity, classifier trained from scratch")
ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
fig.tight_layout()
fig.savefig(OUT / "12_accuracy_vs_sparsity.png", dpi=100)

fig, ax = plt.subplots(figsize=(7, 4))
schedule = [cubic_sparsity(t, 0.0, TARGET, 0, n_events, interval) for t in range(steps + 1)]
ax.plot(range(steps + 1), schedule, label="cubic_sparsity(t): s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3")
ax.plot(range(1, len(measured) + 1), measured, ".", markersize=5, label="measured after each step (all matrices)")
ax.set(xlabel="step of the last epoch", ylabel="sparsity",
       title=f"Zhu & Gupta schedule: n={n_events} events, dt={interval}")
ax.legend(fontsize=8, loc="lower right")
fig.tight_layout()
fig.savefig(OUT / "12_schedule.png", dpi=100)

# %% [markdown]
# Training with the mask fixed wins back part of what the one-shot cut lost. Pruning gradually lets the
# weights that stay take over the work of those that go while they go, a little at a time; Zhu & Gupta find
# it matches or beats one-shot pruning with retraining at the same sparsity. On a run this short and a test
# set this small, read the two markers with a margin of a few points.
#
# ## 6. What actually gets faster
#
# A zero still costs a multiply in a dense matrix product: the kernel does not look at the values. A sparse
# format (CSR) skips the zeros, but stores an index per weight and reads memory irregularly, so it gains far
# less than the tenfold cut in multiplications, and only for a weight converted to it. Removing heads and
# neurons instead makes every matrix smaller, and a smaller dense matmul is faster.

# %%
def median_times(functions: dict, rounds: int) -> dict:
    """Median seconds of each function, the functions taking turns so that a busy moment hits them all."""
    times = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


torch.manual_seed(0)
B, T = TIMING_BATCH
x = torch.randn(B * T, 384)
weight = torch.randn(1536, 384)  # a MiniLM linear1
sparse_weight = weight.clone()
sparse_weight[weight.abs() < weight.abs().flatten().kthvalue(round(0.9 * weight.numel())).values] = 0.0
with warnings.catch_warnings():  # torch calls its CSR support "beta" on first use
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    csr = sparse_weight.to_sparse_csr()
with torch.inference_mode():
    matmul = median_times({"dense": lambda: x @ weight.T, "zeros": lambda: x @ sparse_weight.T,
                           "csr": lambda: (csr @ x.T).T}, rounds=15)
t_dense, t_zeros, t_csr = matmul["dense"], matmul["zeros"], matmul["csr"]
zeros_ratio, csr_ratio = t_zeros / t_dense, t_csr / t_dense
print(f"(1536 x 384) weight times {B * T} tokens: dense {t_dense * 1e3:.1f} ms; the same with 90% zeros "
      f"{t_zeros * 1e3:.1f} ms ({zeros_ratio:.2f}x); CSR {t_csr * 1e3:.1f} ms ({csr_ratio:.2f}x)")

masked_minilm = copy.deepcopy(reference)
prune_heads(masked_minilm, 0.5)
prune_neurons(masked_minilm, 0.5)
shrunk_minilm = copy.deepcopy(masked_minilm)
structure = shrink_structure(shrunk_minilm)
ids = torch.randint(1000, tokenizer.vocab_size, (B, T))
with torch.inference_mode():
    shrink_max_diff = (shrunk_minilm(ids).last_hidden_state - masked_minilm(ids).last_hidden_state).abs().max().item()
    forward = median_times({"dense": lambda: reference(ids), "shrunk": lambda: shrunk_minilm(ids)}, rounds=3)
t_full, t_shrunk = forward["dense"], forward["shrunk"]
shrunk_speedup = t_full / t_shrunk
def encoder_parameters(model):
    return sum(p.numel() for layer in encoder_layers(model).values() for p in layer.parameters())


params_ratio = encoder_parameters(shrunk_minilm) / encoder_parameters(reference)
print(f"structure per layer: {structure['layers.0']}; encoder parameters {params_ratio:.0%} of the dense ones")
print(f"shrunk vs masked outputs: largest difference {shrink_max_diff:.1e}")
print(f"MiniLM forward on {B} x {T} tokens: dense {t_full * 1e3:.0f} ms, heads and neurons halved "
      f"{t_shrunk * 1e3:.0f} ms: {shrunk_speedup:.2f}x faster")

# %% [markdown]
# The shrunk model keeps the embeddings and every layer's width C: only the attention's inner width
# (heads x 32) and the feed-forward width shrink, so the time falls with the encoder's share of the work.
# `shrink_structure` returned the new shapes per layer. Saved weights no longer fit a freshly built MiniLM;
# `apply_structure` gives the fresh model those shapes first, and then a plain `load_state_dict` fits
# (after `make_permanent`, which folds the masks into the weights and drops them).

# %%
make_permanent(shrunk_minilm)
rebuilt = apply_structure(load_pretrained("minilm")[0], structure)
rebuilt.load_state_dict(shrunk_minilm.state_dict())  # strict: every name and shape must match
with torch.inference_mode():
    rebuilt_equal = torch.equal(rebuilt(ids).last_hidden_state, shrunk_minilm(ids).last_hidden_state)
print(f"rebuilt from the structure and loaded: identical outputs {rebuilt_equal}")

# %% [markdown]
#
# ## What to remember
#
# * A mask is the whole of unstructured pruning: keep the largest |w|, multiply, and re-apply the mask
#   after every optimizer step, or AdamW brings the zeros back.
# * Magnitude beats random; global ranking lets the network's scale decide which layers to empty.
# * Training around the mask recovers accuracy; a cubic schedule prunes during the training instead.
# * Scattered zeros save storage (with a sparse format) but not time; removing heads and neurons saves
#   time and costs more accuracy at the same count.

# %%
print(f"RESULT: mask_matches_torch={mask_matches_torch} mask_by_hand={mask_by_hand} revived={revived} "
      f"revived_after_apply={revived_after_apply} dense_acc={dense_acc:.4f} "
      f"magnitude_acc={one_shot['layer'][at_target]:.4f} global_acc={one_shot['global'][at_target]:.4f} "
      f"random_acc={one_shot['random'][at_target]:.4f} oneshot_acc={oneshot_acc:.4f} "
      f"minilm_sparsity_min={minilm_sparsity_min:.4f} "
      f"minilm_sparsity_max={minilm_sparsity_max:.4f} structured_acc={structured_acc:.4f} "
      f"unstructured_acc={unstructured_acc:.4f} cos_structured={cos['structured']:.4f} "
      f"cos_unstructured={cos['unstructured']:.4f} oneshot_ft_acc={oneshot_ft_acc:.4f} gradual_acc={gradual_acc:.4f} "
      f"gradual_exact={gradual_exact} zeros_ratio={zeros_ratio:.3f} csr_ratio={csr_ratio:.3f} "
      f"shrink_max_diff={shrink_max_diff:.2e} rebuilt_equal={rebuilt_equal} params_ratio={params_ratio:.4f} "
      f"shrunk_speedup={shrunk_speedup:.3f}")
