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
# # Lesson 06 — Full fine-tuning
#
# Lessons 02 and 03 trained a classifier from random weights; lesson 05 loaded a pretrained encoder,
# MiniLM (`sentence-transformers/all-MiniLM-L6-v2`, 6 layers of width 384, 22.7M parameters), and
# trained only a linear probe on its frozen features. Here we put a new classification head on
# MiniLM and train **every** weight on IMDB: full fine-tuning, as BERT did it (Devlin et al. 2019).
# Then we look at what the training did to the pretrained model:
#
# 1. the model: which parameters are pretrained, which are new, and how well it does before training;
# 2. fine-tuning with BERT's recipe (AdamW, warm-up, linear decay), and a learning rate 5-20x too large;
# 3. how far each layer moved from its pretrained values;
# 4. catastrophic forgetting: the skill MiniLM was trained for, measured before and after.
#
# The code used: `tunelab/core/bert.py` (the model), `tunelab/core/hub.py` (`load_pretrained`) and
# `tunelab/tasks/imdb_finetune.py` (`run_imdb_finetune`, which calls `train_model` of lesson 03).

# %%
import dataclasses
import os
import shutil
import sys
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:  # as a script: write figures to files, no window (a notebook shows them)
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from tunelab.core.data import load_imdb
from tunelab.core.hub import load_pretrained
from tunelab.core.plots import read_metrics
from tunelab.core.train import TrainConfig, evaluate
from tunelab.tasks.imdb_finetune import (FinetuneData, FinetuneRunConfig, encode_reviews, make_collator,
                                         run_imdb_finetune)

QUICK = os.environ.get("QUICK", "0") not in ("", "0")
N_TRAIN = 400 if QUICK else 1000  # train-split reviews (a tenth is held out for validation)
N_TEST = 200 if QUICK else 1000  # class-balanced test-split reviews
MAX_LENGTH = 32 if QUICK else 128  # WordPiece tokens per review, [CLS] and [SEP] included
EPOCHS = 1 if QUICK else 2
LR = 2e-4 if QUICK else 5e-5  # see section 2
HIGH_LR = 1e-3  # five (quick) to twenty times too large
N_PAIRS = 200  # held-out reviews for the forgetting test of section 4
PAIR_LENGTH = 64 if QUICK else MAX_LENGTH  # tokens per half-review there: 32 are too few to match halves
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
OUT = Path(os.environ.get("TUNELAB_LESSONS_OUT", HERE / "out"))  # figures land next to the lesson
OUT.mkdir(parents=True, exist_ok=True)
torch.set_printoptions(precision=3, sci_mode=False)

# %% [markdown]
# ## 1. A pretrained encoder with a new head
#
# `load_pretrained("minilm", task="classification")` builds `BertForSequenceClassification`: the
# BERT encoder (embeddings, 6 encoder layers, the pooler tanh(W h[CLS] + b)) and a linear classifier
# on the pooled [CLS] vector. The checkpoint fills the encoder and the pooler; it has no classifier,
# so the classifier starts from BERT's random initialisation. `run_imdb_finetune` seeds torch with 0
# before it loads the model, so with the same seed we get exactly the model it will start from.

# %%
torch.manual_seed(0)
model, tokenizer = load_pretrained("minilm", task="classification")
before = {name: tensor.clone() for name, tensor in model.state_dict().items()}  # for section 3


def part(name: str) -> str:
    """The part of BertForSequenceClassification a parameter belongs to."""
    if name.startswith("bert.layers."):
        return f"layer {int(name.split('.')[2]) + 1}"  # bert.layers.<i>.<attn|ff|norm1|norm2>...
    return name.split(".")[1] if name.startswith("bert.") else "classifier"


counts = {}
for name, parameter in model.named_parameters():
    counts[part(name)] = counts.get(part(name), 0) + parameter.numel()
n_parameters = sum(counts.values())
head_parameters = counts["classifier"]
print(f"{'part':<12}{'parameters':>12}{'share':>8}")
for key, count in counts.items():
    print(f"{key:<12}{count:>12,}{count / n_parameters:>8.1%}")
print(f"{'total':<12}{n_parameters:>12,}")
print(f"word embeddings alone: {model.bert.embeddings.word_embeddings.weight.numel():,} "
      f"({tokenizer.vocab_size:,} WordPiece tokens x {model.config.hidden_size})")

# %% [markdown]
# Half of MiniLM is its embedding table; each encoder layer holds 1.8M parameters; the new head only
# 770 (384 x 2 weights + 2 biases). Which weights does the checkpoint *not* fill? Load the model a
# second time under another seed: whatever differs was drawn at random.

# %%
torch.manual_seed(1)
other, _ = load_pretrained("minilm", task="classification")
random_names = [name for name, tensor in other.state_dict().items() if not torch.equal(tensor, before[name])]
print("parameters that depend on the seed:", random_names, "(the classifier bias starts at 0 in both)")
del other

# %% [markdown]
# A random head on top of good features is still a random classifier. We tokenize a class-balanced
# test subset once with MiniLM's own WordPiece tokenizer, exactly as `run_imdb_finetune` does
# (`encode_reviews`: head+tail truncation; `make_collator`: [CLS] ... [SEP], padding), and measure:

# %%
data = FinetuneData(limit=N_TRAIN, test_limit=N_TEST, max_length=MAX_LENGTH, validation_size=0.1, seed=0)
collate = make_collator(tokenizer, data)
test_set = load_imdb("test", limit=N_TEST, seed=data.seed)
test_examples = [{"input_ids": ids, "label": label} for ids, label in
                 zip(encode_reviews(tokenizer, test_set["text"], MAX_LENGTH, data.truncation), test_set["label"])]
untrained = evaluate(model, test_examples, collate_fn=collate, batch_size=64)
print(f"before fine-tuning: test accuracy {untrained['accuracy']:.3f}, loss {untrained['loss']:.3f} "
      f"on {untrained['n']} reviews (chance: 0.5 and ln 2 = {np.log(2):.3f})")

# %% [markdown]
# ## 2. Fine-tuning every weight
#
# BERT's recipe (Devlin et al. 2019, appendix A.3): AdamW, batch 16 or 32, learning rate 2e-5 to
# 5e-5, a linear warm-up over the first steps, then linear decay to 0, 2 to 4 epochs. The rate is
# 30 to 60 times smaller than the 3e-3 lesson 02 used from scratch: the pretrained weights are
# already good and should only be nudged. Warm-up matters here: the gradient of the first steps
# flows through a random head, and a full-size step taken with Adam's still unreliable moment
# estimates would push the whole encoder in a random direction.
#
# The quick run takes only a couple of dozen optimizer steps on reviews cut to 32 tokens, so it uses
# 2e-4, near the upper end of the range searched for small BERTs (Turc et al. 2019: 3e-5 to 3e-4);
# the full run uses 5e-5.
# `run_imdb_finetune` tokenizes, carves a validation set out of the training reviews, trains with
# length-bucketed batches, keeps the best epoch on validation and evaluates it once on test. We run
# it twice: with the recipe, and with a learning rate of 1e-3.

# %%
def finetune(lr: float, name: str) -> tuple[dict, Path]:
    """Fully fine-tune MiniLM on IMDB at learning rate `lr`; return the results and the run folder."""
    train = TrainConfig(epochs=EPOCHS, batch_size=16, lr=lr, warmup=0.1, schedule="linear", weight_decay=0.01,
                        eval_batch_size=64, log_every_steps=1, progress=False, plot=False)
    run_dir = OUT / name
    results = run_imdb_finetune(FinetuneRunConfig(model="minilm", data=data, train=train), run_dir)
    print(f"lr {lr:g}: {results['steps']} steps on {results['train_examples']} reviews in "
          f"{results['train_seconds']:.0f} s; best validation accuracy {results['best_validation']:.3f}; "
          f"test accuracy {results['test_accuracy']:.3f}, loss {results['test_loss']:.3f} "
          f"on {results['test_examples']} reviews")
    return results, run_dir


results, run_dir = finetune(LR, "06_minilm")
high_results, high_dir = finetune(HIGH_LR, "06_minilm_high_lr")
acc_after, acc_high_lr = results["test_accuracy"], high_results["test_accuracy"]

# %% [markdown]
# A run folder is a Hugging Face model folder (config.json, model.safetensors, tokenizer.json) plus
# the TuneLab run: metrics.jsonl and checkpoints. Note the sizes: the resumable checkpoint holds
# AdamW's two moment estimates per weight, twice the model again. For full fine-tuning that is three
# copies of every parameter in memory and on disk, the cost that LoRA (lesson 07) removes. We do not
# resume these runs, so the checkpoints go.

# %%
for label, path in (("model.safetensors", run_dir / "model.safetensors"),
                    ("checkpoints/last/model.safetensors", run_dir / "checkpoints/last/model.safetensors"),
                    ("checkpoints/last/optimizer.safetensors", run_dir / "checkpoints/last/optimizer.safetensors")):
    print(f"{label:<40}{path.stat().st_size / 1e6:>8.1f} MB")
for folder in (run_dir, high_dir):
    shutil.rmtree(folder / "checkpoints")

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
for folder, lr, color, style in ((run_dir, LR, "tab:blue", "-"), (high_dir, HIGH_LR, "tab:red", "--")):
    history = [r for r in read_metrics(folder / "metrics.jsonl") if "train_loss" in r]
    steps = [r["step"] for r in history]
    losses = np.array([r["train_loss"] for r in history])
    smooth = np.convolve(losses, np.ones(5) / 5, mode="valid")  # the mean of 5 batches
    left.plot(steps, losses, color=color, alpha=0.25)
    left.plot(steps[4:], smooth, color=color, label=f"lr {lr:g} (mean of 5 batches)")
    right.plot(steps, [r["lr"] / lr for r in history], color=color, linestyle=style, label=f"peak lr {lr:g}")
left.axhline(np.log(2), color="gray", linestyle="--", label="ln 2: guessing")
left.set(xlabel="optimizer step", ylabel="training loss (batch of 16)", title="Fine-tuning MiniLM on IMDB")
left.legend(fontsize=8)
right.set(xlabel="optimizer step", ylabel="learning rate / peak learning rate",
          title="The schedule of both runs: warm-up, then linear decay")
right.legend(fontsize=8)
fig.tight_layout()
fig.savefig(OUT / "06_finetune_curves.png", dpi=100)
print(f"test accuracy: before {untrained['accuracy']:.3f}, after (lr {LR:g}) {acc_after:.3f}, "
      f"after (lr {HIGH_LR:g}) {acc_high_lr:.3f}")

# %% [markdown]
# With the recipe the test accuracy is far above chance after a couple of dozen steps on a few
# hundred labelled reviews: the features were already there, and the head plus a small adjustment
# of the encoder were all that was missing. The loss, though, is still not far below ln 2: the
# predictions point the right way but are timid. The head starts near zero and Adam moves
# each weight by at most about the learning rate per step, so at a rate this small the logits need
# many steps to grow. At 1e-3 the updates wreck the pretrained features before the head has learned
# to use them: the loss rises above ln 2, falls back to it and stays there, and the model is no
# better than a guess.
#
# ## 3. How far did each layer move?
#
# Two ways to look. **Weights**: for each part of the model, the relative change
# ||W_after - W_before|| / ||W_before|| (all tensors of the part together) between the pretrained model
# of section 1 and a fine-tuned one. **Representations**: what each layer computes, on 64 test
# reviews: 1 - the cosine similarity between a token's hidden state in the fine-tuned and in the
# pretrained model, averaged over the tokens ("embeddings" is the input of layer 1).

# %%
def weight_change(tuned_model) -> dict:
    """Relative change ||after - before|| / ||before|| of each part, all its tensors together."""
    after = tuned_model.state_dict()
    squared_change, squared_norm = {}, {}
    for name, tensor in before.items():
        key = part(name)
        squared_change[key] = squared_change.get(key, 0.0) + float((after[name] - tensor).pow(2).sum())
        squared_norm[key] = squared_norm.get(key, 0.0) + float(tensor.pow(2).sum())
    return {key: (squared_change[key] / squared_norm[key]) ** 0.5 for key in squared_change}


probe = collate(test_examples[:64])
probe.pop("labels")
mask = probe["attention_mask"].bool()  # (B, T): real tokens


@torch.no_grad()
def hidden_states(classifier) -> tuple:
    """The embedding output and every layer's output, (B, T, C) each."""
    return classifier.eval().bert(**probe, output_hidden_states=True).hidden_states


def representation_change(classifier) -> list[float]:
    """1 - mean cosine similarity of each real token's hidden state to the pretrained model's, per layer."""
    return [1 - float(torch.nn.functional.cosine_similarity(a[mask], b[mask], dim=-1).mean())
            for a, b in zip(hidden_states(classifier), pretrained_states)]


pretrained_states = hidden_states(model)
tuned, _ = load_pretrained(run_dir, task="classification")
high, _ = load_pretrained(high_dir, task="classification")
change, high_change = weight_change(tuned), weight_change(high)
layer_names = ["embeddings"] + [f"layer {i + 1}" for i in range(model.config.num_hidden_layers)]
rep_change, high_rep_change = representation_change(tuned), representation_change(high)
print(f"{'':<12}{'weights':>20}{'':>10}{'outputs':>20}")
print(f"{'part':<12}{'lr ' + format(LR, 'g'):>20}{'lr ' + format(HIGH_LR, 'g'):>10}"
      f"{'lr ' + format(LR, 'g'):>20}{'lr ' + format(HIGH_LR, 'g'):>10}")
for key in counts:
    outputs = ""
    if key in layer_names:
        i = layer_names.index(key)
        outputs = f"{rep_change[i]:>20.2e}{high_rep_change[i]:>10.2e}"
    print(f"{key:<12}{change[key]:>20.2e}{high_change[key]:>10.2e}{outputs}")
word_before = before["bert.embeddings.word_embeddings.weight"]
row_change = (tuned.bert.embeddings.word_embeddings.weight.detach() - word_before).norm(dim=1) / word_before.norm(dim=1)
print(f"word-embedding rows that moved by more than 0.1%: {int((row_change > 1e-3).sum()):,} of {len(row_change):,}")
bottom_change, top_change = change["layer 1"], change[layer_names[-1]]
rep_change_bottom, rep_change_top = rep_change[1], rep_change[-1]

# %%
encoder_parts = [key for key in counts if key != "classifier"]
fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.2))
x = np.arange(len(encoder_parts))
left.bar(x - 0.2, [change[k] for k in encoder_parts], width=0.4, color="tab:blue", label=f"lr {LR:g}")
left.bar(x + 0.2, [high_change[k] for k in encoder_parts], width=0.4, color="tab:red", label=f"lr {HIGH_LR:g}")
left.set_xticks(x, encoder_parts, rotation=30)
left.set(yscale="log", ylabel="||W_after - W_before|| / ||W_before||", title="Weights: how far each part moved")
x = np.arange(len(layer_names))
right.bar(x - 0.2, rep_change, width=0.4, color="tab:blue", label=f"lr {LR:g}")
right.bar(x + 0.2, high_rep_change, width=0.4, color="tab:red", label=f"lr {HIGH_LR:g}")
right.set_xticks(x, layer_names, rotation=30)
right.set(yscale="log", ylabel="1 - cosine(fine-tuned, pretrained)",
          title="Outputs: how much each layer's hidden states changed")
for ax in (left, right):
    ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(OUT / "06_weight_change.png", dpi=100)

# %% [markdown]
# **Weights.** With the recipe every encoder layer moved by about a percent, the top ones a
# little more than the bottom ones: fine-tuning is a small correction. Depth hardly matters here
# because Adam scales every weight's step to about the learning rate, whatever the size of its
# gradient; what differs is how consistently a weight is pushed the same way. The pooler, right under
# the new head, is pushed most consistently and moves most. The embedding table moves least: a row
# gets a gradient only when its token occurs in a training batch, and a few hundred reviews use only
# a tenth of the vocabulary; the other rows only shrink a little by weight decay.
#
# **Outputs.** Here the lower layers do move less, by far: the states leaving layer 1 are almost
# those of the pretrained model, while those leaving layer 6 changed tens of times more. Small
# changes add up from layer to layer, and the top layers are where features for the task are made.
# Merchant et al. (2020) found the same in BERT: fine-tuning mostly rewrites the top layers and
# leaves the lower ones' representations, words and syntax useful to any task, nearly intact. That
# is why some recipes give lower layers smaller learning rates or freeze them (Howard & Ruder 2018,
# ULMFiT). At 1e-3 every layer moved about five times further, and the top layers' states became
# something else entirely.
#
# ## 4. Catastrophic forgetting
#
# A network trained on a new task loses what it learned before, unless something protects it
# (McCloskey & Cohen 1989; Kirkpatrick et al. 2017). Fine-tuning on IMDB knows nothing of the
# pretraining objective, so the question is how much of the old skill survives.
#
# MiniLM as packaged has no masked-language-model head, but it has the skill it was trained for:
# all-MiniLM-L6-v2 was trained on a billion pairs of related texts to give them nearby
# mean-pooled embeddings. We test exactly that on reviews no run has seen: cut each of N held-out
# reviews in two, embed every first and every second half (the mean of the last hidden states over
# the tokens, as sentence-transformers does), and count how often the second half nearest
# (cosine similarity) to a first half is its own. Chance is 1/N. The fine-tuned models go through
# the same test with their fine-tuned encoders (`model.bert`), the classification head unused.

# %%
pair_set = load_imdb("test", limit=N_TEST + N_PAIRS, seed=1)  # another seed: other reviews than section 1's
seen = set(test_set["text"])
pair_texts = [text for text in pair_set["text"] if text not in seen][:N_PAIRS]
halves = []
for ids in tokenizer.encode_batch(pair_texts, add_special_tokens=False):
    middle = len(ids) // 2
    halves.append((ids[:middle], ids[middle:]))  # the collator cuts each half to PAIR_LENGTH tokens
pair_collate = make_collator(tokenizer, dataclasses.replace(data, max_length=PAIR_LENGTH))


@torch.no_grad()
def embed(encoder, pieces: list[list[int]]) -> torch.Tensor:
    """Mean-pooled, L2-normalised last hidden states of an encoder (BertModel): (N, C)."""
    encoder.eval()
    vectors = []
    for start in range(0, len(pieces), 64):
        batch = pair_collate([{"input_ids": ids} for ids in pieces[start:start + 64]])
        hidden = encoder(**batch).last_hidden_state  # (B, T, C)
        real = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1): padding does not count
        vectors.append(torch.nn.functional.normalize((hidden * real).sum(1) / real.sum(1), dim=-1))  # (B, C)
    return torch.cat(vectors)


def nearest_second_half(encoder) -> torch.Tensor:
    """For each first half, the index of the most similar second half (cosine similarity): (N,)."""
    first, second = embed(encoder, [a for a, _ in halves]), embed(encoder, [b for _, b in halves])  # (N, C)
    return (first @ second.T).argmax(dim=1)


nearest = {"pretrained": nearest_second_half(model.bert), f"lr {LR:g}": nearest_second_half(tuned.bert),
           f"lr {HIGH_LR:g}": nearest_second_half(high.bert)}
own = torch.arange(len(halves))
hits = {key: index == own for key, index in nearest.items()}  # (N,) each: found its own second half
print(f"{len(halves)} reviews; chance of finding its own second half: {1 / len(halves):.3f}")
for key in nearest:
    print(f"{key:<12} found its own second half: {float(hits[key].float().mean()):.3f}")
match_pretrained, match_after, match_high_lr = (float(h.float().mean()) for h in hits.values())
forgetting = 1 - match_after / match_pretrained  # share of the pretrained skill lost
forgetting_high_lr = 1 - match_high_lr / match_pretrained
lost = int((hits["pretrained"] & ~hits[f"lr {LR:g}"]).sum())
gained = int((~hits["pretrained"] & hits[f"lr {LR:g}"]).sum())
print(f"lr {LR:g}: {lost} reviews matched before and not after, {gained} after and not before")
print(f"skill lost: {forgetting:.0%} at lr {LR:g}, {forgetting_high_lr:.0%} at lr {HIGH_LR:g}")

# %% [markdown]
# A couple of dozen steps of sentiment training already cost MiniLM a good part of the skill it was
# built for, although its weights moved by only about a percent: the embeddings are read from the
# last layer, whose states changed most (section 3). The larger learning rate, which did not even
# learn sentiment, destroys most of the skill. A small learning rate keeps the model close to its
# pretrained weights, and closeness in weights is what preserves the old skill. The remedies all
# build on that: few steps and small rates; penalising distance from the pretrained weights (EWC,
# Kirkpatrick et al. 2017, weights the penalty by how much each weight mattered to the old task);
# or not touching the pretrained weights at all and training a few new ones instead: adapters, LoRA
# and prompt tuning (lessons 07 to 09), after which the old model is still there, untouched.
#
# ## What to remember
#
# * Full fine-tuning trains every weight of a pretrained encoder plus a new, randomly initialised head;
#   before training the model is a random classifier, after a couple of dozen steps a useful one.
# * BERT's recipe: AdamW, small learning rate (2e-5 to 5e-5 for BERT-base), warm-up, linear decay.
#   Ten times more and the pretrained features are wrecked.
# * With Adam the weights of every layer move by about as much (about a percent here); what the layers
#   compute changes little at the bottom and most at the top.
# * The old skill is partly forgotten, more so with a larger learning rate; and full fine-tuning
#   keeps three copies of every weight (weights and two AdamW moments).

# %%
print(f"RESULT: acc_before={untrained['accuracy']:.4f} acc_after={acc_after:.4f} acc_high_lr={acc_high_lr:.4f} "
      f"params={n_parameters} head_params={head_parameters} bottom_change={bottom_change:.3e} "
      f"top_change={top_change:.3e} embedding_change={change['embeddings']:.3e} "
      f"pooler_change={change['pooler']:.3e} rep_change_bottom={rep_change_bottom:.3e} "
      f"rep_change_top={rep_change_top:.3e} match_pretrained={match_pretrained:.4f} "
      f"match_after_finetune={match_after:.4f} match_high_lr={match_high_lr:.4f} "
      f"forgetting={forgetting:.4f} forgetting_high_lr={forgetting_high_lr:.4f}")
