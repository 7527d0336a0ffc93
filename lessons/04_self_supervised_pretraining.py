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
# # Lesson 04 — Self-supervised pretraining, then fine-tuning
#
# Labels are scarce, text is plentiful. IMDB has 25,000 labelled training reviews, but also 50,000
# reviews nobody labelled. Self-supervised pretraining makes the text its own teacher: hide some
# words and train a model to guess them back. To guess well it must learn which words go together
# and how sentences are built, and a classifier fine-tuned from it starts from that knowledge
# instead of from random weights. This is BERT's masked language modelling (MLM; Devlin et al.
# 2019, https://arxiv.org/abs/1810.04805). This lesson:
#
# 1. counts labelled and unlabelled reviews;
# 2. masks one short review with `MaskedLMCollator`, then measures the 15% and the 80/10/10 rule
#    on a large batch;
# 3. pretrains a small `BertForMaskedLM` on IMDB text with `run_imdb_mlm`, measures it before and
#    after, looks at its tied decoder and asks it to fill in a blank;
# 4. fine-tunes a classifier twice on the same few labelled reviews, once from the pretrained
#    weights and once from the very weights pretraining started from, so that pretraining is the
#    only difference;
# 5. asks what it would take to beat a strong linear baseline.
#
# The code lives in `tunelab/core/collate.py` (`MaskedLMCollator`), `tunelab/core/bert.py` (the
# model), `tunelab/core/hub.py` (model folders), `tunelab/tasks/imdb_mlm.py` (pretraining) and
# `tunelab/tasks/imdb_finetune.py` (fine-tuning).

# %%
import os
import sys
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:  # as a script: write figures to files, no window (a notebook shows them)
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import safetensors
import torch

from tunelab.core.bert import BertForMaskedLM
from tunelab.core.collate import MaskedLMCollator, pad_sequences
from tunelab.core.data import load_imdb
from tunelab.core.hub import load_pretrained, save_pretrained
from tunelab.core.plots import read_metrics
from tunelab.core.train import TrainConfig, evaluate
from tunelab.tasks.imdb_finetune import FinetuneData, FinetuneRunConfig, run_imdb_finetune
from tunelab.tasks.imdb_mlm import MlmData, MlmRunConfig, bert_tokenizer, chunk_reviews, imdb_texts, run_imdb_mlm

QUICK = os.environ.get("QUICK", "0") not in ("", "0")
N_TEXTS = 1000 if QUICK else 10000  # reviews to pretrain on (unlabelled first)
VOCAB_SIZE = 4000  # WordPiece vocabulary
MAX_LENGTH = 128  # pieces per chunk when pretraining, tokens per review when fine-tuning
MODEL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256)
MLM_BATCH, MLM_LR = 16, 2e-3  # one epoch over the chunks
N_LABELLED = 1000 if QUICK else 2000  # the small labelled set (a fifth is held out for validation)
N_TEST = 1000 if QUICK else 5000  # class-balanced test reviews
FT_EPOCHS = 6
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
OUT = Path(os.environ.get("TUNELAB_LESSONS_OUT", HERE / "out"))  # figures land next to the lesson
OUT.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)

# %% [markdown]
# ## 1. Labels are scarce, text is plentiful
#
# The `unsupervised` split holds reviews without a label (-1). `run_imdb_mlm` pretrains on those and
# on the texts of the `train` split (their labels unused); it never reads the test split.

# %%
for split in ("train", "test", "unsupervised"):
    labels = load_imdb(split)["label"]
    print(f"{split:<13}{len(labels):>7,} reviews, labels {sorted(set(labels))}")

# %% [markdown]
# ## 2. Masking: what the model is asked to guess
#
# `run_imdb_mlm` trains a WordPiece tokenizer (lesson 01) on its texts and cuts each review into
# chunks of at most 126 pieces between `[CLS]` and `[SEP]`. We build the same tokenizer on the
# same texts here, to look at the masks before training.
#
# `MaskedLMCollator` chooses 15% of the real pieces (never `[CLS]`, `[SEP]` or padding). The
# labels hold the original piece there and -100 everywhere else, so the loss counts only the
# chosen pieces. Of the chosen ones, 80% become `[MASK]`, 10% a random piece and 10% stay as
# they are: at fine-tuning time no piece is `[MASK]`, so the model must not learn that only
# `[MASK]` positions matter, and it must check every word it reads.

# %%
mlm_data = MlmData(limit=N_TEXTS, vocab_size=VOCAB_SIZE, max_length=MAX_LENGTH, validation_size=0.05)
texts = imdb_texts(mlm_data)
tokenizer = bert_tokenizer(texts, VOCAB_SIZE)
chunks = chunk_reviews(tokenizer, texts, MAX_LENGTH, mlm_data.min_chunk)
print(f"{len(texts):,} reviews -> {len(chunks):,} chunks; vocabulary {tokenizer.vocab_size:,} pieces; "
      f"specials {dict(zip(tokenizer.convert_ids_to_tokens(tokenizer.special_ids), tokenizer.special_ids))}")

collate = MaskedLMCollator(mask_id=tokenizer.mask_id, vocab_size=tokenizer.vocab_size,
                           special_ids=tokenizer.special_ids, pad_id=tokenizer.pad_id, max_length=MAX_LENGTH,
                           mlm_probability=0.15, seed=14)  # one fixed draw
review = min(texts[:500], key=len)  # a short real review
print(review)
example = {"input_ids": tokenizer.encode(review)}  # [CLS] pieces [SEP]
batch = collate([example])
original = tokenizer.convert_ids_to_tokens(example["input_ids"])
masked = tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
labels = batch["labels"][0].tolist()
print(f"\n{'position':>8}  {'piece':<12}{'model input':<14}{'label':>6}")
for t, (piece, shown, label) in enumerate(zip(original, masked, labels)):
    if label != -100:
        what = "[MASK]" if shown == "[MASK]" else "kept" if shown == piece else "random"
        print(f"{t:>8}  {piece:<12}{shown:<14}{label:>6}   chosen: {what}")
print("\nmodel input:", " ".join(masked))
print("labels:     ", labels)

# %% [markdown]
# One review gives a handful of chosen pieces; the rule is about averages. Over a batch of a few
# hundred chunks: the share of maskable pieces that were chosen, and what became of them.

# %%
big = MaskedLMCollator(mask_id=tokenizer.mask_id, vocab_size=tokenizer.vocab_size,
                       special_ids=tokenizer.special_ids, pad_id=tokenizer.pad_id, max_length=MAX_LENGTH, seed=0)
sample = chunks[:512]
batch = big(sample)
original_ids, _ = pad_sequences([c["input_ids"] for c in sample], tokenizer.pad_id)  # (B, T), before masking
maskable = (batch["attention_mask"] == 1) & ~torch.isin(original_ids, torch.tensor(tokenizer.special_ids))
chosen = batch["labels"] != -100  # (B, T)
assert torch.equal(batch["labels"][chosen], original_ids[chosen])  # labels are the original pieces
became = batch["input_ids"][chosen]
mask_rate = float(chosen.sum() / maskable.sum())
mask_token_share = float((became == tokenizer.mask_id).float().mean())
kept_share = float((became == original_ids[chosen]).float().mean())
random_share = 1 - mask_token_share - kept_share
print(f"{int(maskable.sum()):,} maskable pieces, {int(chosen.sum()):,} chosen: rate {mask_rate:.4f} (target 0.15)")
print(f"of the chosen: [MASK] {mask_token_share:.3f}, random piece {random_share:.3f}, kept {kept_share:.3f} "
      "(target 0.8 / 0.1 / 0.1)")

# %% [markdown]
# (A random draw lands on the original piece once in V draws; it then counts as kept.)
#
# ## 3. Pretraining a small BERT
#
# `run_imdb_mlm` does everything above, then trains a randomly initialised `BertForMaskedLM` to
# predict the chosen pieces, holding 5% of the chunks out with fixed masks to measure it. Training
# is `train_model` from lesson 03 with `cross_entropy_loss` over the chosen positions: only the
# loss's labels differ from classification. The run folder is a Hugging Face model folder.

# %%
mlm_dir = OUT / "04_mlm"
mlm_config = MlmRunConfig(
    data=mlm_data, model=MODEL,
    train=TrainConfig(epochs=1, batch_size=MLM_BATCH, lr=MLM_LR, weight_decay=0.01, warmup=0.06, metric="loss",
                      metric_mode="min", eval_every_steps=50 if QUICK else 200, log_every_steps=10,
                      eval_batch_size=128, progress=not QUICK, plot=False))
mlm = run_imdb_mlm(mlm_config, mlm_dir)
print({key: mlm[key] for key in ("texts", "train_chunks", "validation_chunks", "steps", "parameters",
                                 "train_seconds")})
print("run folder:", sorted(p.name for p in mlm_dir.iterdir()))

# %% [markdown]
# **The run's tokenizer.** `run_imdb_mlm` trained its own tokenizer on the same texts. Hugging Face's
# WordPiece trainer finds the same pieces each time, but numbers them in a hash-map order that changes
# from one training to the next, so `train_tokenizer` renumbers them in sorted order; only when its
# last merges tie can a piece or two differ. Whatever a retraining gives, a model must be fed the ids
# it was trained on, so from here on we use the tokenizer saved in the run folder, as one always should.
#
# **Before and after.** `torch.manual_seed(0)` followed by `BertForMaskedLM(config)` rebuilds the
# exact weights the run started from (`run_imdb_mlm` seeds with `train.seed`, 0). We score both on
# chunks of 200 test-split reviews, which pretraining never read, with the same fixed masks.
# Accuracy is the share of chosen pieces whose most probable prediction is the original piece.

# %%
pretrained, run_tokenizer = load_pretrained(mlm_dir, task="mlm")
ours, theirs = tokenizer.tokenizer.get_vocab(), run_tokenizer.tokenizer.get_vocab()
print(f"the run's tokenizer has the same pieces as ours: {set(ours) == set(theirs)}; "
      f"pieces numbered differently: {sum(ours[piece] != theirs.get(piece) for piece in ours)}")
tokenizer = run_tokenizer  # a model must be fed with the ids it was trained on
torch.manual_seed(0)
initial = BertForMaskedLM(pretrained.config).eval()
held_out = chunk_reviews(tokenizer, load_imdb("test", limit=200, seed=1)["text"], MAX_LENGTH, mlm_data.min_chunk)
before = evaluate(initial, held_out, collate_fn=big, batch_size=128)
after = evaluate(pretrained, held_out, collate_fn=big, batch_size=128)
counts = torch.bincount(torch.tensor([i for c in chunks for i in c["input_ids"][1:-1]]), minlength=VOCAB_SIZE)
frequencies = counts[counts > 0] / counts.sum()
unigram = float(-(frequencies * frequencies.log()).sum())  # nats
print(f"{len(held_out)} held-out chunks, {before['n']:,} chosen pieces")
print(f"random init:  loss {before['loss']:.3f}, accuracy {before['accuracy']:.4f}   (ln V = "
      f"{torch.log(torch.tensor(float(VOCAB_SIZE))):.3f}: a uniform guess)")
print(f"pretrained:   loss {after['loss']:.3f}, accuracy {after['accuracy']:.4f}   "
      f"(the run's own validation: loss {mlm['val_mlm_loss']:.3f}, accuracy {mlm['val_mlm_accuracy']:.4f})")
print(f"predicting every blank from piece frequencies alone, without context: loss {unigram:.3f}")

# %% [markdown]
# The random model spreads its guess over the whole vocabulary: loss about ln V. The first thing
# MLM training learns is how frequent each piece is ("the", ",", "."), which already brings the
# loss down to the unigram entropy. Everything below that line comes from reading the context.

# %%
history = read_metrics(mlm_dir / "metrics.jsonl")
fig, ax = plt.subplots(figsize=(7, 4))
train_points = [(r["step"], r["train_loss"]) for r in history if "train_loss" in r]
val_points = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
ax.plot(*zip(*train_points), alpha=0.6, label="train loss (chosen pieces)")
ax.plot(*zip(*val_points), "o-", label="validation loss (fixed masks)")
ax.axhline(unigram, color="tab:red", linestyle="--", label=f"piece frequencies only ({unigram:.2f})")
ax.axhline(before["loss"], color="gray", linestyle=":", label=f"random init ({before['loss']:.2f})")
ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats)",
       title=f"MLM pretraining: {mlm['texts']:,} reviews, {mlm['parameters']:,} parameters")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(OUT / "04_mlm_curve.png", dpi=100)

# %% [markdown]
# **The tied decoder.** The output layer scores every piece of the vocabulary with a dot product
# against a (V, C) matrix, exactly the shape of the input embedding table. BERT uses the same
# tensor for both (Press & Wolf 2017): a word's input vector is also the vector its prediction
# is matched against, and V·C parameters are saved. The file on disk holds the matrix once.

# %%
embedding = pretrained.bert.embeddings.word_embeddings.weight
tied = pretrained.decoder_weight is embedding and pretrained.decoder_weight.data_ptr() == embedding.data_ptr()
with safetensors.safe_open(str(mlm_dir / "model.safetensors"), "pt") as f:
    stored = [name for name in f.keys() if name.startswith("cls.")]
n_parameters = sum(p.numel() for p in pretrained.parameters())
print(f"decoder weight is the embedding tensor: {tied}; shape {tuple(embedding.shape)}")
print(f"parameters {n_parameters:,}; an untied decoder would add {embedding.numel():,} "
      f"({embedding.numel() / n_parameters:.0%} more); MLM-head tensors in the file: {stored}")

# %% [markdown]
# **Fill in the blank.** The model's top five pieces for a `[MASK]`, with their probabilities:

# %%
top_fives = []
for sentence in ("this movie was [MASK] , i loved every minute of it .",
                 "the acting was terrible and the [MASK] made no sense ."):
    ids = tokenizer.encode(sentence)
    position = ids.index(tokenizer.mask_id)
    with torch.no_grad():
        probabilities = torch.softmax(pretrained(torch.tensor([ids]))[0, position], dim=-1)  # (V,)
    top = probabilities.topk(5)
    guesses = ", ".join(f"{piece} {p:.3f}" for piece, p in
                        zip(tokenizer.convert_ids_to_tokens(top.indices), top.values.tolist()))
    print(f"{sentence}\n    -> {guesses}")
    top_fives.append(top.indices.tolist())
print("the two blanks get the same five guesses:", top_fives[0] == top_fives[1])

# %% [markdown]
# Five guesses that do not depend on the sentence are piece frequencies, not reading: the
# model has learned that "the" and "," are common, which is where the loss curve sits too.

# %% [markdown]
# ## 4. Fine-tuning: pretrained versus scratch
#
# Now the question that matters: does pretraining make a better classifier from few labels? We
# fine-tune twice, with identical data, settings and seed, on a class-balanced subset of
# `N_LABELLED` training reviews (a fifth held out for validation), and test on a class-balanced
# test subset:
#
# * from the MLM run folder;
# * from a folder holding the random weights pretraining started from, written by
#   `save_pretrained` with the same config and tokenizer.
#
# `run_imdb_finetune` loads each folder as a `BertForSequenceClassification`: the encoder comes
# from the file, the pooler and classifier (which MLM never trained) start from the same seeded
# random values in both runs. So the only difference is pretraining.

# %%
scratch_dir = save_pretrained(initial, OUT / "04_scratch_init", tokenizer)
finetune_train = TrainConfig(epochs=FT_EPOCHS, batch_size=32, lr=5e-4, weight_decay=0.01, warmup=0.1,
                             eval_batch_size=128, progress=False, plot=False)
finetuned = {}
for name, folder in (("pretrained", mlm_dir), ("scratch", scratch_dir)):
    config = FinetuneRunConfig(model=str(folder), train=finetune_train, data=FinetuneData(
        limit=N_LABELLED, test_limit=N_TEST, validation_size=0.2, max_length=MAX_LENGTH))
    finetuned[name] = run_imdb_finetune(config, OUT / f"04_finetune_{name}")
    r = finetuned[name]
    print(f"{name:<11} test accuracy {r['test_accuracy']:.4f} on {r['test_examples']:,} reviews "
          f"(best validation {r['best_validation']:.3f}; {r['train_examples']} training reviews, "
          f"{r['train_seconds']:.0f} s)")
acc_pretrained, acc_scratch = finetuned["pretrained"]["test_accuracy"], finetuned["scratch"]["test_accuracy"]
gain = acc_pretrained - acc_scratch
print(f"pretraining changes the test accuracy by {gain:+.4f}")

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
for name, color in (("pretrained", "tab:blue"), ("scratch", "tab:orange")):
    records = [r for r in read_metrics(OUT / f"04_finetune_{name}" / "metrics.jsonl") if "val_accuracy" in r]
    epochs = [r["epoch"] for r in records]
    left.plot(epochs, [r["val_accuracy"] for r in records], "o-", color=color, label=f"from {name} weights")
    right.plot(epochs, [r["val_loss"] for r in records], "o-", color=color, label=f"from {name} weights")
left.set(xlabel="epoch", ylabel="validation accuracy", title=f"Fine-tuning on {N_LABELLED:,} labelled reviews")
right.set(xlabel="epoch", ylabel="validation loss", title="Validation loss")
for ax in (left, right):
    ax.legend()
fig.tight_layout()
fig.savefig(OUT / "04_pretrained_vs_scratch.png", dpi=100)
print("figures:", sorted(p.name for p in OUT.glob("04_*.png")))

# %% [markdown]
# **What the numbers say.** Pretraining helps only if the pretrained model knows something a
# random one does not. Ours, after one short epoch on a CPU, has barely left the frequency line
# (the quick run sits on it; the full run, ten times longer, gets about half a nat below it) and
# guesses the same pieces whatever the sentence. The classifier fine-tuned from it does *worse*
# than the one fine-tuned from random weights, in the quick run and in the full one.
#
# A likely reason: a random start is not a blank start. Its attention is close to uniform (the
# scores q·k of 0.02-scale weights are near 0), so the `[CLS]` vector begins as an average over
# the whole review, a bag of words that a classifier picks up from a few hundred reviews. The MLM
# weights have moved away from that average toward predicting "the" everywhere, and fine-tuning
# has to undo that first. An MLM model is worth starting from only once its loss has fallen well
# below the frequency line, when its attention heads have learned to look at particular
# neighbours; that drop comes suddenly and late in training (Chen et al. 2024, "Sudden drops in
# the loss"), far beyond what a quick lesson can afford.
#
# ## 5. What it would take to beat NBSVM
#
# NBSVM, a linear model on word and word-pair counts (Wang & Manning 2012), scores 91.22% on the
# full IMDB test set; our best transformer trained from scratch reaches 88.9%
# (benchmarks/RESULTS.md). Pretraining is how transformers get past such baselines, but only
# when the pretrained model has learned more than word frequencies. Getting there takes more
# text (all 75,000 IMDB reviews, or general text as BERT used), many more steps (BERT trained
# for a million steps of 128,000 tokens each; our quick run takes about 200 steps of 2,048), and
# a model large enough to use them: an accelerator's work, not a laptop's.
# `benchmarks/imdb_mlm.py` runs that larger setting: a BERT-mini-sized model (4 layers, width
# 256) pretrained on all 75,000 reviews, then fine-tuned on all the labelled ones; it records its
# figures in benchmarks/RESULTS.md.
#
# ## What to remember
#
# * MLM turns unlabelled text into a training signal: hide 15% of the pieces, 80/10/10
#   [MASK]/random/kept, and predict them; labels are -100 everywhere else.
# * The output layer is tied to the input embeddings: one (V, C) matrix, stored once.
# * Pretraining first learns piece frequencies; a model still near that loss is no better a
#   start than random weights (here: worse). Check the MLM loss before expecting a gain.
# * Compare pretrained and scratch with everything else equal: same architecture, tokenizer,
#   initial weights, data, settings and seed.

# %%
print(f"RESULT: mask_rate={mask_rate:.4f} mask_token_share={mask_token_share:.4f} random_share={random_share:.4f} "
      f"mlm_acc_before={before['accuracy']:.4f} mlm_acc_after={after['accuracy']:.4f} "
      f"acc_pretrained={acc_pretrained:.4f} acc_scratch={acc_scratch:.4f} gain={gain:.4f}")
