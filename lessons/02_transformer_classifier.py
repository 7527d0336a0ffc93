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
# # Lesson 02 — A transformer classifier from scratch
#
# Lesson 01 turned reviews into padded batches of token ids. This lesson builds the model that reads
# them, one piece at a time, checking each piece with numbers rather than trusting it:
#
# 1. token embeddings and sinusoidal positions;
# 2. one attention head step by step on a tiny example: scores, padding mask, softmax;
# 3. the explicit attention path against PyTorch's fused kernel;
# 4. padding invariance: a review gets the same logits alone or padded inside a batch;
# 5. the parameter count, component by component, against the formula;
# 6. a short training run on IMDB with `train_model`, the test accuracy, and the attention of the
#    trained model on a short review.
#
# The model lives in `tunelab/core/classifier.py` (built from `attention.py` and `layers.py`):
# about 400 lines in all, worth reading next to this lesson.

# %%
import dataclasses
import inspect
import math
import os
import sys
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:  # as a script: write figures to files, no window (a notebook shows them)
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from tunelab.core.attention import MultiHeadAttention, make_attention_bias, scaled_dot_product_attention
from tunelab.core.checkpoint import load_model_weights
from tunelab.core.classifier import ClassifierConfig, TransformerClassifier
from tunelab.core.collate import ClassificationCollator, LengthBucketSampler
from tunelab.core.data import load_imdb, train_validation_split
from tunelab.core.layers import SinusoidalPositionalEncoding
from tunelab.core.plots import plot_curves
from tunelab.core.text import build_vocab
from tunelab.core.train import TrainConfig, evaluate, train_model
from tunelab.tasks.imdb_classification import encode_examples

QUICK = os.environ.get("QUICK", "0") not in ("", "0")
N_TRAIN = 3000 if QUICK else 10000  # train-split reviews (a tenth is held out for validation)
N_TEST = 1000 if QUICK else 5000
MAX_LENGTH = 128 if QUICK else 256
MODEL = dict(d_model=32, n_heads=2, n_layers=2, d_ff=64)
if not QUICK:
    MODEL = dict(d_model=64, n_heads=4, n_layers=2, d_ff=256)
EPOCHS = 2 if QUICK else 3
VOCAB_SIZE = 10000 if QUICK else 20000
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
OUT = Path(os.environ.get("TUNELAB_LESSONS_OUT", HERE / "out"))  # figures land next to the lesson
OUT.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
torch.set_printoptions(precision=3, sci_mode=False)

# %% [markdown]
# ## 0. Data, as in lesson 01
#
# A validation set is carved from the *train* split (it chooses the best epoch); the test split is
# used once, at the end. The vocabulary is built on the training part only.

# %%
train_val = load_imdb("train", limit=N_TRAIN, seed=0)
train_set, val_set = train_validation_split(train_val, validation_size=0.1, seed=0)
test_set = load_imdb("test", limit=N_TEST, seed=0)
vocab = build_vocab(train_set["text"], min_freq=2, max_size=VOCAB_SIZE)


# Token ids (basic_english, head+tail truncated as in lesson 01) and the label of every review.
train_examples, val_examples, test_examples = (
    encode_examples(split, vocab, MAX_LENGTH) for split in (train_set, val_set, test_set)
)
collate = ClassificationCollator(max_length=MAX_LENGTH, pad_id=vocab["<pad>"])
print(f"{len(train_examples)} train, {len(val_examples)} validation, {len(test_examples)} test reviews; "
      f"vocabulary of {len(vocab)}; at most {MAX_LENGTH} tokens per review")

# %% [markdown]
# ## 1. The model at a glance
#
# `ClassifierConfig` holds every hyper-parameter; `TransformerClassifier` turns token ids `(B, T)`
# into logits `(B, 2)`:
#
# tokens -> embedding x sqrt(d_model) + positions -> N encoder layers (pre-norm: attention and a
# feed-forward network, each added back to a residual stream) -> final LayerNorm -> mean over the
# real tokens -> linear head.

# %%
config = ClassifierConfig(vocab_size=len(vocab), max_len=MAX_LENGTH, dropout=0.1, **MODEL)
model = TransformerClassifier(config)
print(config)
print(model)
print(inspect.getsource(TransformerClassifier.encode))

# %% [markdown]
# ## 2. Embeddings and positions
#
# The embedding table gives each token id a vector of `d_model` numbers. Attention itself is blind
# to order ("dog bites man" and "man bites dog" hold the same vectors), so a position signal is
# added. Vaswani et al. 2017 use fixed sinusoids of geometrically spaced wavelengths:
# PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(pos / 10000^(2i/d)).
# Low dimensions oscillate fast, high dimensions slowly, like the hands of a clock.

# %%
positions = SinusoidalPositionalEncoding(max_len=MAX_LENGTH, d_model=64)
pe = positions.pe  # (max_len, C), a buffer: not trained, not saved in checkpoints
print("table:", tuple(pe.shape), "| trainable parameters in it:", sum(p.numel() for p in positions.parameters()))
for start in (0, 10, 60):
    print(f"PE[{start}] . PE[{start + 5}] = {float(pe[start] @ pe[start + 5]):.4f}")

# %% [markdown]
# The dot product of two positions depends only on their distance (the three numbers above are
# equal): sin(a)sin(b) + cos(a)cos(b) = cos(a - b). A layer can therefore learn to look "5 tokens
# back" wherever it is in the sequence.

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
for dim in (0, 1, 10, 30):
    left.plot(pe[:, dim], label=f"dimension {dim}")
left.set(xlabel="position", ylabel="value", title="A few positional dimensions")
left.legend(loc="lower left", fontsize=8)
image = right.imshow(pe.T, aspect="auto", cmap="RdBu", origin="lower")
right.set(xlabel="position", ylabel="dimension", title="The whole sinusoidal table")
fig.colorbar(image, ax=right)
fig.tight_layout()
fig.savefig(OUT / "02_positions.png", dpi=100)

# %% [markdown]
# ## 3. One attention head, step by step
#
# Take four token vectors of width 4, the last of which is padding. One head projects each vector to
# a query, a key and a value; the score of query i against key j is their dot product divided by
# sqrt(d); padding keys get a huge negative bias so that softmax gives them weight 0; each output
# is the weighted average of the values.

# %%
tokens = ["a", "great", "film", "<pad>"]
x = torch.randn(1, 4, 4)  # (B=1, T=4, C=4)
mask = torch.tensor([[1, 1, 1, 0]])  # (B, T): 1 = real token, 0 = padding
head = MultiHeadAttention(d_model=4, n_heads=1, impl="explicit")
with torch.no_grad():
    q, k, v = head.q_proj(x)[0], head.k_proj(x)[0], head.v_proj(x)[0]  # (T, D) each
    scores = q @ k.T / math.sqrt(4)  # (T, T): row = query, column = key
    bias = make_attention_bias(mask, causal=False, T=4, dtype=torch.float32)  # (B, 1, 1, T)
    weights = torch.softmax(scores + bias[0, 0], dim=-1)  # (T, T), rows sum to 1
    by_hand = head.out_proj(weights @ v)  # (T, C)
    by_module = head(x, mask)[0]  # (T, C)
print("scores (query rows x key columns):\n", scores)
print("bias added for padding:", bias[0, 0, 0].tolist())
print("attention weights (the <pad> column is 0):\n", weights)
print("rows sum to", weights.sum(dim=-1))
print(f"by hand vs MultiHeadAttention: max |difference| = {(by_hand - by_module).abs().max():.2e}")

# %% [markdown]
# The padding *query* (last row) still attends to the real tokens: its output is finite and is
# simply ignored later by the pooling. Why `finfo.min` and not `-inf`? A row whose keys are all
# padding would give softmax(-inf, ..., -inf) = 0/0 = NaN; a huge finite number gives uniform
# weights instead. A decoder (lesson 15) also hides future tokens with a causal mask:

# %%
print("query t may attend to key s (rows t, columns s):")
print(make_attention_bias(None, causal=True, T=4, dtype=torch.float32)[0, 0] == 0)

# %% [markdown]
# With several heads the same computation runs in parallel on slices of width d_model / n_heads,
# and the heads' outputs are concatenated before `out_proj`. This function returns the weights of
# every head; the check below confirms it reproduces the module, so we can trust it for the
# heatmap at the end.

# %%
def attention_weights(attn: MultiHeadAttention, h: torch.Tensor, mask=None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(D) + bias) of every head of `attn` on input h (B, T, C): (B, H, T, T)."""
    B, T, C = h.shape
    q = attn.q_proj(h).view(B, T, attn.n_heads, attn.d_head).transpose(1, 2)  # (B, H, T, D)
    k = attn.k_proj(h).view(B, T, attn.n_heads, attn.d_head).transpose(1, 2)  # (B, H, T, D)
    scores = q @ k.transpose(-2, -1) / math.sqrt(attn.d_head)  # (B, H, T, T)
    bias = make_attention_bias(mask, False, T, scores.dtype)
    return torch.softmax(scores if bias is None else scores + bias, dim=-1)  # (B, H, T, T)


mha = MultiHeadAttention(d_model=32, n_heads=4, impl="explicit")
h = torch.randn(3, 10, 32)  # (B, T, C)
mask = (torch.arange(10)[None, :] < torch.tensor([[10], [7], [3]])).long()  # (B, T): lengths 10, 7, 3
with torch.no_grad():
    w = attention_weights(mha, h, mask)  # (B, H, T, T)
    v = mha.v_proj(h).view(3, 10, 4, 8).transpose(1, 2)  # (B, H, T, D)
    rebuilt = mha.out_proj((w @ v).transpose(1, 2).reshape(3, 10, 32))  # (B, T, C)
    print(f"{w.shape=}; rebuilt vs module: {(rebuilt - mha(h, mask)).abs().max():.2e}")

# %% [markdown]
# ## 4. Explicit and fused attention agree
#
# The explicit path spells softmax(QK^T/sqrt(d) + bias)V out in PyTorch operations (readable,
# debuggable); the fused path hands the same tensors to `F.scaled_dot_product_attention`, which
# never materialises the (T, T) matrix and is the one to use for training. Both share this function:

# %%
print(inspect.getsource(scaled_dot_product_attention))
fused = MultiHeadAttention(d_model=32, n_heads=4, impl="fused")
fused.load_state_dict(mha.state_dict())  # same weights, other path
with torch.no_grad():
    attention_diff = max(float((mha(h, mask, causal=causal) - fused(h, mask, causal=causal)).abs().max())
                         for causal in (False, True))
    batch = collate(test_examples[:8])
    explicit_model = TransformerClassifier(dataclasses.replace(config, attn_impl="explicit")).eval()
    explicit_model.load_state_dict(model.state_dict())
    model.eval()
    logits_fused = model(batch["input_ids"], batch["attention_mask"])  # (B, 2)
    logits_explicit = explicit_model(batch["input_ids"], batch["attention_mask"])  # (B, 2)
fused_vs_explicit = max(attention_diff, float((logits_fused - logits_explicit).abs().max()))
print(f"attention layer: max |explicit - fused| = {attention_diff:.2e}")
print(f"whole classifier on 8 test reviews: max |explicit - fused| logits = "
      f"{(logits_fused - logits_explicit).abs().max():.2e}")

# %% [markdown]
# ## 5. Padding invariance
#
# Padding is an artefact of batching; it must not change the answer. Classify a short review alone
# (no padding at all), then inside a batch next to a long review, where it is padded to the long
# one's length. The attention mask keeps padding out of attention and out of the mean pooling, so
# the logits agree to float rounding. Without the mask they do not.

# %%
short, long = sorted(test_examples[:50], key=lambda e: len(e["input_ids"]))[::49]
with torch.no_grad():
    alone = model(torch.tensor([short["input_ids"]]))  # (1, 2), T = its own length
    padded = collate([short, long])  # the short review gets padding up to the long one
    in_batch = model(padded["input_ids"], padded["attention_mask"])[:1]  # (1, 2)
    no_mask = model(padded["input_ids"])[:1]  # padding treated as real tokens
padding_diff = float((alone - in_batch).abs().max())
no_mask_diff = float((alone - no_mask).abs().max())
print(f"short review: {len(short['input_ids'])} tokens, padded to {padded['input_ids'].shape[1]}")
print("alone:         ", alone)
print("padded, mask:  ", in_batch, f"max |difference| = {padding_diff:.2e}")
print("padded, no mask:", no_mask, f"max |difference| = {no_mask_diff:.2e}")

# %% [markdown]
# ## 6. Counting the parameters
#
# Every weight can be accounted for. With vocabulary V, width C, feed-forward width F, L layers and
# K classes:
#
# * token embedding: V·C (the sinusoidal table is a buffer, not a parameter);
# * each layer: attention 4(C·C + C) (q, k, v, out projections with biases), feed-forward
#   C·F + F + F·C + C, two LayerNorms 2·2C;
# * final LayerNorm 2C; head C·K + K.

# %%
V, C, F, L, K = config.vocab_size, config.d_model, config.d_ff, config.n_layers, config.num_classes
formula = {
    "token_embedding": V * C,
    "attention (all layers)": L * 4 * (C * C + C),
    "feed-forward (all layers)": L * (C * F + F + F * C + C),
    "layer norms (all layers)": L * 2 * 2 * C,
    "final_norm": 2 * C,
    "head": C * K + K,
}


def component(name: str) -> str:
    if name.startswith("layers."):
        part = name.split(".")[2]  # layers.<i>.<attn|ff|norm1|norm2>.<...>
        names = {"attn": "attention (all layers)", "ff": "feed-forward (all layers)"}
        return names.get(part, "layer norms (all layers)")
    return name.split(".")[0]


counted = {key: 0 for key in formula}
for name, parameter in model.named_parameters():
    counted[component(name)] += parameter.numel()
print(f"{'component':<28}{'counted':>10}{'formula':>10}")
for key in formula:
    print(f"{key:<28}{counted[key]:>10,}{formula[key]:>10,}")
n_parameters = sum(p.numel() for p in model.parameters())
param_formula_matches = counted == formula and n_parameters == sum(formula.values())
print(f"{'total':<28}{n_parameters:>10,}{sum(formula.values()):>10,}   match: {param_formula_matches}")
print(f"the embedding is {formula['token_embedding'] / n_parameters:.0%} of the model")

# %% [markdown]
# A small classifier like this one is mostly embedding table: the transformer layers are a small
# fraction of the weights (but most of the compute, which grows with T²).
#
# ## 7. Training on IMDB
#
# `train_model` (lesson 03 looks inside it) runs AdamW with a warm-up and linear decay, clips the
# gradient norm, evaluates on the validation set after each epoch and keeps the best checkpoint.
# Length-bucketed batches (lesson 01) keep padding low.

# %%
train_config = TrainConfig(epochs=EPOCHS, batch_size=32, lr=3e-3, warmup=0.1, weight_decay=0.01,
                           out_dir=OUT / "02_run", progress=not QUICK, eval_batch_size=128)
sampler = LengthBucketSampler([len(e["input_ids"]) for e in train_examples], batch_size=32, seed=0)
result = train_model(model, train_examples, val_examples, collate_fn=collate, config=train_config,
                     batch_sampler=sampler)
for record in result.history:
    if "val_accuracy" in record:
        print(f"epoch {record['epoch']:.0f}: validation accuracy {record['val_accuracy']:.3f}, "
              f"loss {record['val_loss']:.3f}")
plot_curves(result.history, OUT / "02_training_curves.png", title="Lesson 02: training on an IMDB subset")

# %% [markdown]
# The best epoch was chosen on validation; its weights are in `checkpoints/best`. Only now do we
# touch the test set, once:

# %%
load_model_weights(model, OUT / "02_run" / "checkpoints" / "best")
test = evaluate(model, test_examples, collate_fn=collate, batch_size=128)
print(f"test accuracy: {test['accuracy']:.3f} on {test['n']} reviews (chance is 0.5), "
      f"best validation accuracy {result.best_metric:.3f} at step {result.best_step}")

# %% [markdown]
# ## 8. What did the first layer look at?
#
# The weights of each head of the first layer on a short review, computed with `attention_weights`
# from its pre-norm input. Rows are queries, columns keys. With a small model trained for a few
# minutes, do not expect linguistics: some heads spread attention evenly (close to a bag of
# words), others lock onto sentiment words or punctuation.

# %%
review = "this film was a total waste of time , the acting was awful but the music is great ."
ids = torch.tensor([vocab.encode(review)])  # (1, T)
model.eval()
with torch.no_grad():
    x = model.position(model.token_embedding(ids) * model.embed_scale)  # (1, T, C), as in encode
    first = model.layers[0]
    w = attention_weights(first.attn, first.norm1(x))[0]  # (H, T, T)
    probability = torch.softmax(model(ids), dim=-1)[0, 1]
print(f"P(positive) = {probability:.3f}")
labels = vocab.lookup_tokens(ids[0].tolist())
n_heads = w.shape[0]
fig, axes = plt.subplots(1, n_heads, figsize=(4.2 * n_heads, 4.6))
for h_index, ax in enumerate(axes):
    ax.imshow(w[h_index], cmap="viridis", vmin=0)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_title(f"layer 1, head {h_index + 1}")
fig.tight_layout()
fig.savefig(OUT / "02_attention.png", dpi=100)
print("figures:", sorted(p.name for p in OUT.glob("02_*.png")))

# %% [markdown]
# ## 9. Word pairs before attention: hashed bigrams
#
# Our first layer sees each word on its own plus its position; "not good" and "good" start as
# the same vector for "good". `ClassifierConfig(bigram_buckets=N)` adds, to every token, a learned
# vector for the pair (token, next token). There are far too many pairs for a table, so the pair is
# hashed into N rows and colliding pairs share a row: fastText's "hashing trick" (Joulin et al.
# 2017). Padding has no pair (row 0, which stays zero), so padding invariance still holds.
#
# Bigrams are many and mostly rare, so they invite memorisation. `token_dropout=0.3` hides 30% of
# the tokens from attention and pooling at each training step ("word dropout", Iyyer et al. 2015),
# so no single word or pair can carry a review. Together they take the `tunelab train imdb` model
# to 88.9% on the full IMDB test set (the imdb_scratch benchmark, benchmarks/README.md). Measured
# one at a time there (2026-11-23), word dropout does most of it (88.3% -> 88.8% without bigrams);
# the bigrams add about 0.1 point for 6.4M extra parameters.

# %%
bigram_model = TransformerClassifier(dataclasses.replace(config, bigram_buckets=200_000)).eval()
pair_ids = torch.tensor([vocab.encode("not good , not bad , good")])  # (1, T)
rows = bigram_model.bigram_ids(pair_ids, None)[0]  # (T,): row of (token t, token t+1); 0 for the last
for t, row in enumerate(rows.tolist()):
    pair = " ".join(vocab.lookup_tokens(pair_ids[0, t : t + 2].tolist()))
    print(f"{pair!r:>14} -> row {row}")
padded_ids = torch.cat([pair_ids, torch.zeros(1, 5, dtype=torch.long)], dim=1)  # five <pad> after
padded_mask = (padded_ids != vocab["<pad>"]).long()
with torch.no_grad():
    bigram_padding_diff = float((bigram_model(pair_ids) - bigram_model(padded_ids, padded_mask)[:1]).abs().max())
print(f"bigram table: {bigram_model.bigram_embedding.weight.numel():,} parameters; "
      f"padding still changes nothing: max |difference| = {bigram_padding_diff:.2e}")
padding_diff = max(padding_diff, bigram_padding_diff)

# %% [markdown]
# ## What to remember
#
# * Embeddings give tokens vectors; sinusoidal positions add order, and their dot products depend
#   only on distance.
# * Attention = softmax(QK^T / sqrt(d) + mask bias) V; the mask gives padding keys zero weight.
# * The explicit and fused paths agree to ~1e-7; a review's logits do not depend on its padding.
# * Parameter counts follow a formula; small classifiers are mostly embedding table.
# * Hashed bigram embeddings let the first layer tell "not good" from "good" for almost no compute.
# * Choose the epoch on validation, then evaluate on test once.

# %%
print(f"RESULT: test_accuracy={test['accuracy']:.4f} val_accuracy={result.best_metric:.4f} "
      f"parameters={n_parameters} param_formula_matches={param_formula_matches} "
      f"fused_vs_explicit={fused_vs_explicit:.2e} padding_diff={padding_diff:.2e} no_mask_diff={no_mask_diff:.2e}")
