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
# # Lesson 16 — Pretraining a small GPT on movie reviews
#
# No pretrained causal LM can be downloaded here, so TuneLab makes its own: a small Llama that learns to
# continue IMDB reviews. Pretraining is next-token prediction on raw text, and everything about it is in
# the data pipeline and the loss:
#
# 1. a byte-level BPE tokenizer trained on the reviews (GPT-2's scheme, Radford et al. 2019): nothing unknown,
#    every string round-trips;
# 2. packing: reviews joined with an end-of-text token and cut into equal blocks, so no position is padding;
# 3. the loss at initialisation is ln(V), and perplexity = exp(loss) reads as "choosing among that many
#    tokens"; a unigram model (token frequencies alone) is the bar to clear;
# 4. training through `train_model`: the loss curve, validation perplexity, greedy samples;
# 5. transfer: the pretrained decoder with a classification head against the same model from random
#    weights, on a few labelled reviews (ULMFiT's argument, Howard & Ruder 2018,
#    https://arxiv.org/abs/1801.06146).
#
# The code used: `tunelab/core/text.py` (`train_tokenizer`), `tunelab/tasks/imdb_lm.py` (`pack`,
# `run_imdb_lm`), `tunelab/core/decoder.py` (`Llama`, `LlamaForSequenceClassification`) and
# `benchmarks/imdb_lm.py` / `benchmarks/imdb_lm_transfer.py` for the full-size runs.

# %%
import json
import math
import os
import sys
from collections import Counter
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:  # as a script: write figures to files, no window (a notebook shows them)
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from tunelab.core.collate import ClassificationCollator
from tunelab.core.data import load_imdb
from tunelab.core.decoder import Llama, LlamaConfig, decoder_from_hf_config
from tunelab.core.evaluation import causal_lm_loss
from tunelab.core.hub import CausalTokenizer, load_pretrained
from tunelab.core.text import BYTE_BPE_SPECIALS, train_tokenizer
from tunelab.core.train import TrainConfig, evaluate, train_model
from tunelab.tasks.imdb_lm import LmRunConfig, pack, run_imdb_lm

QUICK = os.environ.get("QUICK", "0") not in ("", "0")
REVIEWS = 2000 if QUICK else 20000  # unlabelled reviews for pretraining
VOCAB, BLOCK = (1024, 64) if QUICK else (4096, 128)
MODEL = dict(hidden_size=64 if QUICK else 192, num_hidden_layers=2 if QUICK else 4, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=172 if QUICK else 512)
STEPS = 200 if QUICK else 1500
LABELLED, TEST = (400, 400) if QUICK else (1000, 2000)
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
OUT = Path(os.environ.get("TUNELAB_LESSONS_OUT", HERE / "out"))
OUT.mkdir(parents=True, exist_ok=True)
RUN = OUT / "16_lm_run"
torch.manual_seed(0)

# %% [markdown]
# ## 1. A byte-level BPE tokenizer
#
# BPE starts from the 256 byte values and merges the most frequent adjacent pair until the vocabulary is
# full. Working on bytes means no text is ever unknown (emoji, accents, HTML left in the reviews), and a word
# keeps its leading space as part of the token ("Ġmovie"), so decoding is concatenation.

# %%
texts = list(load_imdb("unsupervised", limit=REVIEWS, seed=0)["text"])
EOS, PAD = BYTE_BPE_SPECIALS
tokenizer = CausalTokenizer(train_tokenizer(texts, kind="byte_bpe", vocab_size=VOCAB), EOS, PAD)
sentence = "This movie was surprisingly good, although the ending felt rushed. 10/10 \u2764"
ids = tokenizer.encode(sentence)
pieces = [tokenizer.decode([i]) for i in ids]
roundtrip = tokenizer.decode(ids) == sentence
sample = texts[:200]
bytes_per_token = sum(len(t.encode()) for t in sample) / sum(len(x) for x in tokenizer.encode_batch(sample))
print(f"{len(sentence.encode())} bytes -> {len(ids)} tokens: {pieces}")
print(f"round trip exact: {roundtrip}; {bytes_per_token:.2f} bytes per token on reviews (vocabulary {VOCAB})")

# %% [markdown]
# ## 2. Packing
#
# Reviews vary from a line to pages. Padding them to a common length would spend most of the compute on pad
# positions; instead every review is followed by `<|endoftext|>` (the model learns where a review ends) and
# the stream is cut into blocks of `BLOCK` tokens. A block may start mid-review: the model sees such starts
# at training time too, which is fine for a language model.

# %%
blocks = pack(tokenizer, texts[:50], BLOCK)
stream_tokens = sum(len(x) + 1 for x in tokenizer.encode_batch(texts[:50], add_special_tokens=False))
eos_in_blocks = sum(b["input_ids"].count(tokenizer.eos_id) for b in blocks)
print(f"50 reviews -> {stream_tokens} tokens -> {len(blocks)} blocks of {BLOCK} (the last partial one dropped); "
      f"{eos_in_blocks} review boundaries inside them, 0 padding")

# %% [markdown]
# ## 3. What a loss means: ln(V), perplexity, the unigram bar
#
# An untrained model spreads its probability evenly, so its loss is about ln(V) and its perplexity about V.
# A model that only knew token frequencies (a unigram model) reaches exp(entropy of the frequencies); anything
# that uses context must beat that.

# %%
config = LlamaConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=BLOCK, eos_token_id=tokenizer.eos_id,
                     pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.eos_id, tie_word_embeddings=True, **MODEL)
fresh = Llama(config).eval()
batch = torch.tensor([b["input_ids"] for b in blocks[:8]])
with torch.no_grad():
    init_loss = causal_lm_loss(fresh(batch), batch).item()
counts = Counter(t for b in blocks for t in b["input_ids"])
total = sum(counts.values())
unigram_ppl = math.exp(-sum(c / total * math.log(c / total) for c in counts.values()))
print(f"loss at initialisation {init_loss:.3f} vs ln(V) = {math.log(tokenizer.vocab_size):.3f}; "
      f"unigram perplexity {unigram_ppl:.0f}")

# %% [markdown]
# ## 4. Pretraining
#
# `run_imdb_lm` puts the pieces together: tokenizer, packing, a held-out 5% of the reviews for validation,
# AdamW with warmup and a cosine decay through `train_model` (checkpoints, exact resume, the loss curve),
# perplexity on the held-out blocks and greedy samples at each evaluation. `benchmarks/imdb_lm.py` runs the
# same function with a 6-layer model on all 75,000 unlabelled and training reviews.

# %%
run_config = LmRunConfig.from_dict({
    "data": {"limit": REVIEWS, "vocab_size": VOCAB, "block_size": BLOCK, "validation_size": 0.05, "sample_tokens": 20},
    "model": {**MODEL, "max_position_embeddings": BLOCK},
    "train": {"max_steps": STEPS, "batch_size": 16, "lr": 3e-3, "eval_every_steps": STEPS // 4, "progress": False,
              "out_dir": str(RUN)}})
results = run_imdb_lm(run_config, RUN)
history = [json.loads(line) for line in (RUN / "metrics.jsonl").read_text().splitlines()]
val = [(h["step"], math.exp(h["val_loss"])) for h in history if "val_loss" in h]
print(f"validation perplexity {results['val_perplexity']:.1f} after {results['steps']} steps "
      f"({results['train_tokens_seen']:,} tokens); unigram {unigram_ppl:.0f}; uniform {tokenizer.vocab_size}")
for s in results["samples"][:2]:
    print("  sample:", repr(s))

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(*zip(*val), "o-", label="validation perplexity")
ax.axhline(unigram_ppl, color="gray", ls="--", label="unigram model")
ax.set(xlabel="optimizer step", ylabel="perplexity", yscale="log", title="pretraining a small Llama on reviews")
ax.legend()
fig.tight_layout()
fig.savefig(OUT / "16_perplexity.png", dpi=100)

# %% [markdown]
# ## 5. Transfer: does pretraining help a classifier?
#
# `load_pretrained(run, task="classification")` keeps the decoder and puts a new linear head on the last
# real token (an end-of-text token appended to each review: the position that has read all of it). The
# control is the same architecture from random weights, trained with the same budget on the same
# few labelled reviews.

# %%
train_set = load_imdb("train", limit=LABELLED, seed=1)
test_set = load_imdb("test", limit=TEST, seed=1)


def labelled(dataset):
    ids = tokenizer.encode_batch(list(dataset["text"]), add_special_tokens=False)
    return [{"input_ids": x or [tokenizer.eos_id], "label": int(y)} for x, y in zip(ids, dataset["label"])]


collate = ClassificationCollator(max_length=BLOCK, pad_id=tokenizer.pad_id, truncation="head+tail",
                                 eos_id=tokenizer.eos_id)
accuracy = {}
for start in ("pretrained", "random"):
    torch.manual_seed(0)
    if start == "pretrained":
        model, _ = load_pretrained(RUN, task="classification", num_labels=2)
    else:
        model = decoder_from_hf_config(json.loads((RUN / "config.json").read_text()), task="classification")
    train_model(model, labelled(train_set), None, collate_fn=collate,
                config=TrainConfig(epochs=3, batch_size=16, lr=1e-3, schedule="cosine", progress=False, plot=False))
    accuracy[start] = evaluate(model, labelled(test_set), collate_fn=collate)["accuracy"]
print(f"{LABELLED} labelled reviews, {TEST} test reviews: pretrained {accuracy['pretrained']:.1%}, "
      f"random start {accuracy['random']:.1%}")

# %% [markdown]
# At full size, `benchmarks/imdb_lm_transfer.py` runs the same comparison with the 6-layer model of
# `benchmarks/imdb_lm.py` (1,600 steps, 13M tokens), 500 / 2,000 / 22,500 labelled reviews and all 25,000 test
# reviews. Its finished cells are kept in benchmarks/results/imdb_lm_transfer/; this is the transfer curve
# they draw (benchmarks/figures/imdb_lm_transfer.png is the same figure):

# %%
KEPT = HERE.parent / "benchmarks" / "results" / "imdb_lm_transfer"
curve = {}  # (labelled reviews, start) -> test accuracy
for file in sorted(KEPT.glob("*.json")):
    cell = json.loads(file.read_text())
    curve[cell["size"], cell["start"]] = cell["test_accuracy"]
sizes = sorted({size for size, _ in curve})
gains = []
for size in sizes:
    cells = {start: curve[size, start] for start in ("pretrained", "random") if (size, start) in curve}
    line = "  ".join(f"{start} {acc:.2%}" for start, acc in cells.items())
    if len(cells) == 2:
        gains.append(cells["pretrained"] - cells["random"])
        line += f"  gain {gains[-1] * 100:+.1f} points"
    print(f"{size:>6,} labelled reviews: {line}")
fig, ax = plt.subplots(figsize=(5.5, 3.6))
for start, style in (("pretrained", "o-"), ("random", "s--")):
    cells = [(size, curve[size, start]) for size in sizes if (size, start) in curve]
    if cells:
        ax.plot(*zip(*cells), style, label=f"{start} start")
ax.set(xscale="log", xlabel="labelled reviews", ylabel="test accuracy (25,000 reviews)",
       title="what pretraining on reviews buys a classifier")
ax.set_xticks(sizes, [f"{size:,}" for size in sizes])
ax.minorticks_off()
ax.legend()
fig.tight_layout()
fig.savefig(OUT / "16_transfer_curve.png", dpi=100)

# %% [markdown]
# Read the curve from the left. With 500 labels both models fit them within a few epochs (training loss
# near zero), but what the randomly initialised one learns from so few does not carry to new reviews, while
# the pretrained one starts from features that already tell praise from complaint: 80% against 66%. As
# labels grow, the random start learns features of its own and the gap narrows: under 4 points at 2,000,
# under 3 with all 22,500 (88.5% against 86.1%). That is ULMFiT's argument, measured on one machine and one
# corpus.
#
# ## What to remember
#
# * Byte-level BPE never meets an unknown token; packing wastes no compute on padding.
# * Start at loss ln(V); a unigram model is the first bar; perplexity is exp(loss).
# * Whether pretraining helps is measured, not assumed: the same architecture from random weights, with
#   the same labels and steps, is the control. In quick mode the LM has read 2,000 reviews for 200 steps and
#   knows too little to give the classifier a head start (the two accuracies printed above are within
#   noise of each other on 400 test reviews); the full-size comparison is imdb_lm_transfer's.

# %%
print(f"RESULT: roundtrip={roundtrip} bytes_per_token={bytes_per_token:.2f} init_loss={init_loss:.3f} "
      f"ln_v={math.log(tokenizer.vocab_size):.3f} unigram_ppl={unigram_ppl:.1f} "
      f"val_ppl={results['val_perplexity']:.1f} first_val_ppl={val[0][1]:.1f} "
      f"pretrained_acc={accuracy['pretrained']:.3f} random_acc={accuracy['random']:.3f} "
      f"kept_cells={len(curve)} fewest_labels_gain={gains[0] if gains else float('nan'):.3f}")
