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
# # Lesson 01 — From raw IMDB text to padded batches
#
# A model never sees text: it sees a tensor of integers. This lesson walks the road from a raw
# IMDB review to the `(B, T)` batch a transformer eats, and measures every choice on real reviews:
#
# 1. **words**: the `basic_english` tokenizer (what it does to `<br />`, punctuation, contractions);
# 2. **a vocabulary**: frequency order, `min_freq`, the unknown token, how much of the test set a
#    vocabulary of a given size covers;
# 3. **subwords**: BPE and WordPiece tokenizers trained on the reviews, tokens per review;
# 4. **truncation**: keeping the head, the tail, or both of a long review;
# 5. **batches**: dynamic padding, the attention mask, and how much padding length bucketing saves.
#
# Run it with `python lessons/01_tokens_vocab_collate.py` (`QUICK=1` for a smaller, faster run).
# The code it calls lives in `tunelab/core/text.py`, `tunelab/core/data.py` and
# `tunelab/core/collate.py`: open those files beside this one.

# %%
import inspect
import os
import sys
from collections import Counter
from pathlib import Path
from time import perf_counter

import matplotlib

if "ipykernel" not in sys.modules:  # as a script: write figures to files, no window (a notebook shows them)
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

import tunelab.core.text
from tunelab.core.classifier import ClassifierConfig, TransformerClassifier
from tunelab.core.collate import ClassificationCollator, LengthBucketSampler, truncate
from tunelab.core.data import load_imdb
from tunelab.core.text import basic_english, build_vocab, train_tokenizer
from tunelab.core.train import epoch_batches

QUICK = os.environ.get("QUICK", "0") not in ("", "0")
N_TRAIN = 2000 if QUICK else 25000  # reviews of the train split used to build vocabularies
N_TEST = 1000 if QUICK else 5000  # reviews of the test split used to measure coverage
SUBWORD_VOCAB = 4000 if QUICK else 8000
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
OUT = Path(os.environ.get("TUNELAB_LESSONS_OUT", HERE / "out"))  # figures land next to the lesson
OUT.mkdir(parents=True, exist_ok=True)
print(f"QUICK={QUICK}: {N_TRAIN} train reviews, {N_TEST} test reviews; figures go to {OUT}")

# %% [markdown]
# ## 1. The raw data
#
# `load_imdb` returns a Hugging Face `datasets.Dataset` with a `text` and a `label` column
# (0 = negative, 1 = positive). It reads `$TUNELAB_DATA_DIR` if set, else downloads
# `stanfordnlp/imdb`. `limit=` takes a class-balanced random subset, already shuffled (the files
# themselves are sorted: all negatives, then all positives).

# %%
train = load_imdb("train", limit=N_TRAIN, seed=0)
test = load_imdb("test", limit=N_TEST, seed=0)
train_texts, test_texts = list(train["text"]), list(test["text"])
print(train)
print("labels in the subset:", Counter(train["label"]))
example = next(t for t in train_texts if "<br />" in t and len(t) < 900)
print("\nA raw review:\n", example)
print(f"\n{np.mean(['<br />' in t for t in train_texts]):.0%} of reviews contain the HTML line break '<br />'")

# %% [markdown]
# ## 2. Words: the `basic_english` tokenizer
#
# torchtext's `basic_english` tokenizer taught a generation of PyTorch tutorials; torchtext is
# archived now, so TuneLab re-creates it exactly. It lower-cases the text, then applies a short
# list of regular-expression substitutions, in order, and splits on whitespace. Here is that list,
# straight from the file:

# %%
source = inspect.getsource(tunelab.core.text)
start = source.index("_BASIC_ENGLISH_RULES = [")
print(f"# {tunelab.core.text.__file__}")
print(source[start : source.index("]\n", start) + 1])

# %% [markdown]
# What each rule does to a sentence full of traps:

# %%
sentence = 'I didn\'t like it.<br /><br />The plot (if any) was "thin": 3/10! Don\'t bother; really...'
print(sentence)
print(basic_english(sentence))

# %% [markdown]
# * `<br />` disappears (it is replaced by a space), so line breaks leave no token behind;
# * `.` `,` `(` `)` `!` `?` become tokens of their own; `"` `;` `:` are dropped;
# * the apostrophe is split off: `didn't` -> `didn`, `'`, `t`. Negation survives as the pair
#   `didn` + `t`, which matters for sentiment ("not good");
# * anything else stays glued: `3/10` is one token, and so would be `well-made` or an URL.

# %%
train_tokens = [basic_english(t) for t in train_texts]
test_tokens = [basic_english(t) for t in test_texts]
print(f"basic_english tokens per review: mean {np.mean([len(t) for t in train_tokens]):.0f}, "
      f"median {np.median([len(t) for t in train_tokens]):.0f}, max {max(len(t) for t in train_tokens)}")

# %% [markdown]
# ## 3. A vocabulary
#
# A vocabulary maps each token to an integer id. `build_vocab` puts the special tokens first
# (`<pad>` = 0 for padding, `<unk>` = 1 for everything it does not know), then the words by
# decreasing frequency. `min_freq` drops words seen fewer times; `max_size` keeps only the most
# frequent ones. Unknown words map to the id of `<unk>`.

# %%
vocab_all = build_vocab(train_tokens, min_freq=1)  # lists of tokens are taken as already tokenized
vocab = build_vocab(train_tokens, min_freq=2)
print(vocab)
print("first 25 entries:", vocab.get_itos()[:25])
counts = Counter(token for tokens in train_tokens for token in tokens)
for min_freq in (1, 2, 5, 10):
    print(f"min_freq={min_freq:<3} -> {sum(n >= min_freq for n in counts.values()) + 2:>6} entries")
print(f"words seen exactly once: {sum(n == 1 for n in counts.values())} of {len(counts)} distinct words")

# %%
ids = vocab.encode("This movie was flabbergastingly bad.")
print("ids:   ", ids)
print("tokens:", vocab.lookup_tokens(ids))  # the rare word came back as <unk>

# %% [markdown]
# **Coverage.** A vocabulary is built from the training set but used on reviews it has never seen.
# How much of the *test* text does it know? The vocabulary of `max_size=k` is the first k entries
# of the frequency-ordered list, so one list answers the question for every size.

# %%
assert build_vocab(train_tokens, max_size=1000).get_itos() == vocab_all.get_itos()[:1000]
test_counts = Counter(token for tokens in test_tokens for token in tokens)
test_total = sum(test_counts.values())
itos_all = vocab_all.get_itos()
sizes = [s for s in (500, 1000, 2000, 5000, 10000, 20000, 50000) if s < len(itos_all)] + [len(itos_all)]
coverage = []
for size in sizes:
    known = set(itos_all[:size])
    coverage.append(sum(n for token, n in test_counts.items() if token in known) / test_total)
    print(f"vocab size {size:>6}: {coverage[-1]:.2%} of test tokens known, {1 - coverage[-1]:.2%} become <unk>")
known = set(vocab.get_itos())
test_coverage = sum(n for token, n in test_counts.items() if token in known) / test_total
print(f"\nmin_freq=2 vocabulary ({len(vocab)} entries) covers {test_coverage:.2%} of the test tokens")

# %% [markdown]
# Word frequencies follow Zipf's law: a few thousand words cover most running text, and each
# further doubling of the vocabulary buys less. The last few percent are names, typos and rare
# words — often the words that carry the most information about a particular movie.

# %%
fig, ax = plt.subplots(figsize=(6, 4))
ax.semilogx(sizes, [100 * c for c in coverage], marker="o")
ax.set(xlabel="vocabulary size (most frequent training words)", ylabel="% of test tokens known",
       title="Coverage of the IMDB test set")
ax.grid(True, which="both", alpha=0.3)
fig.tight_layout()
fig.savefig(OUT / "01_vocab_coverage.png", dpi=100)

# %% [markdown]
# ## 4. Subword tokenizers: BPE and WordPiece
#
# Instead of giving up on rare words, a subword tokenizer splits them into pieces it knows.
# **BPE** (Sennrich et al. 2016) starts from characters and repeatedly merges the most frequent
# adjacent pair; **WordPiece** (BERT) merges the pair that most raises the likelihood of the corpus.
# `train_tokenizer` trains either on our reviews with Hugging Face `tokenizers`. The pre-tokenizer
# splits on whitespace and punctuation but knows nothing of HTML, so `<br />` would become three
# tokens in every paragraph break. We train on cleaned text (`clean` below) and must clean every
# text we encode the same way: the second example shows what an uncleaned text turns into.

# %%
def clean(text: str) -> str:
    return text.replace("<br />", " ")


bpe = train_tokenizer([clean(t) for t in train_texts], kind="bpe", vocab_size=SUBWORD_VOCAB)
wordpiece = train_tokenizer([clean(t) for t in train_texts], kind="wordpiece", vocab_size=SUBWORD_VOCAB)
print("specials:", [bpe.id_to_token(i) for i in range(5)])
for text in ("The cinematography was unbelievably overhyped.", "Great.<br />Loved it"):
    print(f"\n{text!r}")
    print("  basic_english:", basic_english(text))
    print("  BPE:          ", bpe.encode(text).tokens)
    print("  WordPiece:    ", wordpiece.encode(text).tokens)

# %% [markdown]
# BPE marks the end of a word with `</w>`; WordPiece marks a piece that continues a word with
# `##`. Both rebuild the text with `decode`. Frequent words stay whole, rare ones are split, and
# almost nothing is unknown. The price is longer sequences: how many tokens does a review take?
# (`encode_batch` pads to the longest review of the batch, so count the attention mask, not the ids.)

# %%
def tokens_per_review(tokenizer, texts):
    encodings = tokenizer.encode_batch([clean(t) for t in texts])
    return float(np.mean([sum(e.attention_mask) for e in encodings]))


def unknown_rate(tokenizer, texts):
    unk = tokenizer.token_to_id("[UNK]")
    ids = [i for e in tokenizer.encode_batch([clean(t) for t in texts]) for i in e.ids]
    return ids.count(unk) / len(ids)


same_size = set(itos_all[:SUBWORD_VOCAB])
word_unk = 1 - sum(n for token, n in test_counts.items() if token in same_size) / test_total
bpe_per_review = tokens_per_review(bpe, test_texts)
wordpiece_per_review = tokens_per_review(wordpiece, test_texts)
words_per_review = float(np.mean([len(t) for t in test_tokens]))
print(f"{'tokenizer':<28}{'tokens/review':>14}{'unknown':>10}")
print(f"{'basic_english + vocab':<28}{words_per_review:>14.0f}{word_unk:>10.2%}   (vocab of {SUBWORD_VOCAB})")
print(f"{'BPE':<28}{bpe_per_review:>14.0f}{unknown_rate(bpe, test_texts):>10.2%}")
print(f"{'WordPiece':<28}{wordpiece_per_review:>14.0f}{unknown_rate(wordpiece, test_texts):>10.2%}")

# %% [markdown]
# With the same number of entries, the word vocabulary loses several percent of the test tokens to
# `<unk>`, while the subword tokenizers lose almost none, for sequences only somewhat longer.
# (Part of the difference in length is punctuation: `basic_english` drops `"`, `:` and `;`, the
# subword pre-tokenizer keeps them.) A character they never saw in training is still `[UNK]`.

# %% [markdown]
# ## 5. Truncation: head, tail, or both
#
# Attention costs grow with the square of the length, so reviews are cut to `max_length` tokens.
# Which part to keep? `truncate` offers the head, the tail, or both: Sun et al. 2019 found that
# keeping the first quarter and the last three quarters of the budget works best on IMDB, where
# reviews often end with a verdict ("7/10, recommended").

# %%
ids = list(range(20))
for side in ("head", "tail", "head+tail"):
    print(f"{side:<10}", truncate(ids, max_length=8, side=side))
lengths = np.array([len(t) for t in train_tokens])
for max_length in (128, 256, 512):
    print(f"max_length={max_length}: {np.mean(lengths > max_length):.0%} of reviews are cut, "
          f"{np.maximum(lengths - max_length, 0).sum() / lengths.sum():.0%} of all tokens lost")

# %% [markdown]
# ## 6. Dynamic padding and the attention mask
#
# A batch is a rectangle, reviews are not: shorter ones are filled with `<pad>` (id 0). The
# `ClassificationCollator` truncates each review, pads only to the longest review *of this batch*
# (dynamic padding, rather than always to `max_length`), and returns an `attention_mask` with 1 on
# real tokens and 0 on padding, so that attention and pooling can ignore the padding.

# %%
MAX_LENGTH = 256
collate = ClassificationCollator(max_length=MAX_LENGTH, pad_id=vocab["<pad>"], truncation="head+tail")
short = [i for i, tokens in enumerate(train_tokens) if len(tokens) < 200][:4]  # all shorter than MAX_LENGTH
examples = [{"input_ids": vocab(train_tokens[i]), "label": train["label"][i]} for i in short]
batch = collate(examples)
print("lengths of the 4 reviews:", [len(e["input_ids"]) for e in examples], f"(max_length={MAX_LENGTH})")
for key, value in batch.items():
    print(f"{key:<15} {tuple(value.shape)} {value.dtype}")
print("real tokens per row (mask sums):", batch["attention_mask"].sum(dim=1).tolist())
print("last 6 ids of each row:\n", batch["input_ids"][:, -6:])
print("last 6 mask entries:\n", batch["attention_mask"][:, -6:])

# %% [markdown]
# The collator also adds special tokens inside the length budget, e.g. WordPiece's `[CLS]` and
# `[SEP]`, and can encode raw text itself:

# %%
wp_collate = ClassificationCollator(
    encode=lambda text: wordpiece.encode(clean(text), add_special_tokens=False).ids, max_length=12,
    pad_id=wordpiece.token_to_id("[PAD]"), bos_id=wordpiece.token_to_id("[CLS]"),
    eos_id=wordpiece.token_to_id("[SEP]"),
)
small = wp_collate([{"text": "A wonderful film!", "label": 1}, {"text": "Dull, dull, dull.", "label": 0}])
for row in small["input_ids"]:
    print([wordpiece.id_to_token(int(i)) for i in row])

# %% [markdown]
# ## 7. Length bucketing: how much padding does it save?
#
# With random batches a 50-token review often shares a batch with a 500-token one and gets 450
# padding tokens, which the model computes on and then throws away. `LengthBucketSampler` shuffles
# the reviews, cuts them into buckets of (by default) 50 batches, sorts each bucket by length and
# cuts it into batches, then shuffles the batches: every batch holds reviews of similar length,
# yet the order still changes from epoch to epoch. We count the padding of one epoch over the
# training reviews, truncated to 512 tokens, in batches of 32:

# %%
BATCH = 32
lengths = np.minimum([len(t) for t in train_tokens], 512)


def padding_fraction(batches):
    """Share of the positions in the padded batches that are padding."""
    real = sum(int(lengths[b].sum()) for b in batches)
    total = sum(len(b) * int(lengths[b].max()) for b in batches)
    return 1 - real / total


fixed = 1 - lengths.sum() / (len(lengths) * 512)
random_batches = epoch_batches(len(lengths), BATCH, seed=0, epoch=0)  # what train_model does by default
bucket_batches = list(LengthBucketSampler(lengths, BATCH, seed=0))
padding_random, padding_bucketed = padding_fraction(random_batches), padding_fraction(bucket_batches)
padding_saved = 1 - padding_bucketed / padding_random
print(f"pad every review to 512:          {fixed:.1%} of the positions are padding")
print(f"dynamic padding, random batches:  {padding_random:.1%}")
print(f"dynamic padding, length buckets:  {padding_bucketed:.1%}   ({padding_saved:.0%} of the padding gone)")
for bucket_batches_n in (1, 5, 50, None):
    bucket_size = len(lengths) if bucket_batches_n is None else BATCH * bucket_batches_n
    sampler = LengthBucketSampler(lengths, BATCH, seed=0, bucket_size=bucket_size)
    label = "the whole epoch" if bucket_batches_n is None else f"{bucket_batches_n} batches"
    print(f"  buckets of {label:<16} {padding_fraction(list(sampler)):.1%} padding")

# %% [markdown]
# With batches of 32, nearly every random batch holds one review of 512 tokens or more, so dynamic
# padding alone saves almost nothing here (it shines with small batches or short texts); grouping
# by length is what removes the padding. A bucket of one batch is plain random batching; one bucket
# holding everything sorts the whole epoch (least padding, but every epoch then batches the same
# neighbours together). Fifty batches get nearly all the saving while keeping the batches random.
#
# Padding is not free: the model computes on every position. Timing a forward pass of a small
# transformer over the same reviews shows the saving in seconds:

# %%
model = TransformerClassifier(ClassifierConfig(vocab_size=len(vocab), d_model=64, n_heads=4, n_layers=1,
                                               d_ff=128, max_len=512)).eval()
all_examples = [{"input_ids": vocab(tokens) or [vocab["<unk>"]], "label": 0} for tokens in train_tokens]
collate512 = ClassificationCollator(max_length=512, pad_id=vocab["<pad>"])
n_batches = 6 if QUICK else 30
seconds = {}
with torch.no_grad():
    for name, batches in (("random", random_batches), ("bucketed", bucket_batches)):
        start = perf_counter()
        for indices in batches[:n_batches]:
            model(**{k: v for k, v in collate512([all_examples[i] for i in indices]).items() if k != "labels"})
        seconds[name] = perf_counter() - start
print(f"forward over {n_batches} batches: random {seconds['random']:.2f} s, bucketed {seconds['bucketed']:.2f} s")

# %% [markdown]
# (Only the first few batches are timed, so the ratio is noisy; the token counts above are exact.)

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
left.hist([len(t) for t in train_tokens], bins=60, color="tab:blue")
for x in (256, 512):
    left.axvline(x, color="tab:red", linestyle="--")
    left.text(x, left.get_ylim()[1] * 0.9, f" {x}", color="tab:red")
left.set(xlabel="basic_english tokens per review", ylabel="reviews", title="IMDB review lengths (train)")
names = ["pad to 512", "random batches", "length buckets"]
values = [100 * fixed, 100 * padding_random, 100 * padding_bucketed]
bars = right.bar(names, values, color=["tab:gray", "tab:orange", "tab:green"])
right.bar_label(bars, fmt="%.1f%%")
right.set(ylabel="% of batch positions that are padding", title=f"Padding waste, batches of {BATCH}")
fig.tight_layout()
fig.savefig(OUT / "01_lengths_padding.png", dpi=100)
print("figures:", sorted(p.name for p in OUT.glob("01_*.png")))

# %% [markdown]
# ## What to remember
#
# * `basic_english` drops `<br />`, quotes, `;` and `:`, splits off punctuation and apostrophes.
# * A word vocabulary is ordered by frequency; rare words become `<unk>`. A few thousand words cover
#   most of the test text; subword tokenizers cover nearly all of it with longer sequences.
# * Truncate long reviews (head+tail keeps the verdict), pad each batch only to its longest
#   review, and carry an attention mask so the model can ignore the padding.
# * Length bucketing removes most of the remaining padding at no cost in randomness worth noticing.
#
# Next: lesson 02 builds the transformer that consumes these batches.

# %%
print(f"RESULT: vocab_size={len(vocab)} test_coverage={test_coverage:.4f} "
      f"words_per_review={words_per_review:.1f} bpe_tokens_per_review={bpe_per_review:.1f} "
      f"wordpiece_tokens_per_review={wordpiece_per_review:.1f} padding_random={padding_random:.4f} "
      f"padding_bucketed={padding_bucketed:.4f} padding_saved={padding_saved:.4f}")
