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
# # Lesson 14 — QLoRA: LoRA on a 4-bit base
#
# Lesson 07 froze MiniLM's weights and trained a low-rank update; lesson 11 stored weights in NF4 with
# double-quantized constants, 4.127 bits each. QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314)
# puts the two together: the frozen base is kept in NF4 and decoded, block by block, in every forward
# pass; only the LoRA weights train, in float32.
#
#     Y = X dequant(W_nf4)^T + s X A^T B^T
#
# 1. one layer: our NF4 layer against bitsandbytes' `Linear4bit`, bit for bit;
# 2. QLoRA on MiniLM: what trains, and what 4 bits do to the pretrained model's outputs;
# 3. where the memory goes: weights, gradients, optimizer state and activations, for full fine-tuning,
#    LoRA and QLoRA, and why the backward pass must not keep a decoded copy of the weights;
# 4. fine-tuning on IMDB: QLoRA against LoRA with the same targets, rank and budget;
# 5. merging: exact into a float model, not exact back into 4 bits.
#
# The code used: `tunelab/peft/qlora.py` (prepare_qlora, merge_qlora), `tunelab/quant/linear.py` (Linear4bit,
# DequantizedMatmul) and `tunelab/quant/report.py` (training_memory).

# %%
import copy
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
from torch import nn

from tunelab.core.data import load_imdb
from tunelab.core.hub import load_pretrained
from tunelab.core.train import TrainConfig
from tunelab.peft.lora import LoRAConfig, apply_lora, lora_layers
from tunelab.peft.qlora import QLoRAConfig, merge_qlora, prepare_qlora, qlora_layers
from tunelab.peft.selective import count_parameters
from tunelab.quant.linear import Linear4bit
from tunelab.quant.report import training_memory
from tunelab.tasks.imdb_finetune import FinetuneData, FinetuneRunConfig, load_run, run_imdb_finetune

QUICK = os.environ.get("QUICK", "0") not in ("", "0")
N_TRAIN = 400 if QUICK else 2000  # train-split reviews (a tenth is held out for validation)
N_TEST = 200 if QUICK else 1000  # class-balanced test-split reviews
MAX_LENGTH = 32 if QUICK else 128  # WordPiece tokens per review, [CLS] and [SEP] included
EPOCHS = 2
LR = 2e-3 if QUICK else 1e-3  # lesson 07's rates
R, ALPHA = 8, 16
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
OUT = Path(os.environ.get("TUNELAB_LESSONS_OUT", HERE / "out"))
OUT.mkdir(parents=True, exist_ok=True)
MB = 1e6

# %% [markdown]
# ## 1. One layer in 4 bits, against bitsandbytes
#
# `Linear4bit.from_linear` codes a weight as lesson 11 did: blocks of 64 consecutive weights, each
# divided by its absmax and rounded to the nearest of the 16 NF4 values; the absmax constants
# themselves in 8 bits (double quantization). Its forward decodes the weight and runs a float matmul.
# bitsandbytes does the same in `bnb.nn.Linear4bit`; we compare the bytes and the outputs. (On CPUs
# with AVX512-BF16, bitsandbytes' inference path re-packs the weight with its constants in bfloat16, a
# faster but less exact kernel; we ask for its exact path.)

# %%
torch.manual_seed(0)
minilm, tokenizer = load_pretrained("minilm", task="classification", num_labels=2)
minilm.eval()
query = minilm.bert.layers[0].attn.q_proj  # nn.Linear(384, 384)
ours4 = Linear4bit.from_linear(query, quant_type="nf4", blocksize=64, double_quant=True)
x = torch.randn(4, 384)
try:
    import bitsandbytes as bnb

    theirs4 = bnb.nn.Linear4bit(384, 384, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
    theirs4.weight = bnb.nn.Params4bit(query.weight.data.clone(), requires_grad=False, compress_statistics=True,
                                       quant_type="nf4", blocksize=64)
    theirs4.bias = nn.Parameter(query.bias.data.clone(), requires_grad=False)
    theirs4 = theirs4.to("cpu")  # moving the parameter is what quantizes it
    theirs4.support_avx512bf16_for_cpu = False
    codes_equal = bool(torch.equal(ours4.packed, theirs4.weight.data.view(-1))
                       and torch.equal(ours4.absmax_codes, theirs4.weight.quant_state.absmax))
    with torch.no_grad():
        bnb_diff = float((ours4(x) - theirs4(x)).abs().max())
    print(f"packed codes and 8-bit constants equal to bitsandbytes': {codes_equal}; "
          f"largest output difference {bnb_diff:.1e}")
except ImportError:  # bitsandbytes is in the test extra; the lesson runs without it
    codes_equal, bnb_diff = True, 0.0
    print("bitsandbytes is not installed: the comparison is skipped")
stored = sum(b.numel() * b.element_size() for b in ours4.buffers())  # codes and constants (the bias is apart)
print(f"weight bytes: {stored:,} in 4 bits against {query.weight.numel() * 4:,} in float32 "
      f"({8 * stored / query.weight.numel():.3f} bits per weight)")
with torch.no_grad():
    layer_error = float((ours4(x) - query(x)).abs().max() / query(x).abs().max())
print(f"largest output error of the 4-bit layer: {layer_error:.1%} of the largest output")

# %% [markdown]
# ## 2. QLoRA on MiniLM
#
# `prepare_qlora` adds LoRA adapters, by default to every linear layer except the output layer (QLoRA,
# section 4: the paper finds that adapting all of them is what matches 16-bit fine-tuning), and stores
# the frozen weights they wrap in NF4. The new classification head trains in full, as in lesson 07.
# A fresh adapter adds exact zeros, so the model starts as the *quantized* pretrained model, and the
# 4 bits already move its outputs a little: training starts from there, and the adapter can also learn
# to correct part of the quantization error.

# %%
test_batch = load_imdb("test", limit=32, seed=4)
collate_ids = [tokenizer.encode(t)[:MAX_LENGTH] for t in test_batch["text"]]
T = max(map(len, collate_ids))
ids = torch.tensor([row + [tokenizer.pad_id] * (T - len(row)) for row in collate_ids])
mask = (ids != tokenizer.pad_id).long()
with torch.no_grad():
    float_logits = minilm(ids, mask)
qlora_model = prepare_qlora(copy.deepcopy(minilm), QLoRAConfig(r=R, alpha=ALPHA))
counts = count_parameters(qlora_model)
with torch.no_grad():
    quantized_logits = qlora_model(ids, mask)
quantization_shift = float((quantized_logits - float_logits).abs().max())
print(f"{len(qlora_layers(qlora_model))} layers in NF4 with adapters; trainable {counts.trainable:,} of "
      f"{counts.total:,} ({counts.percent:.2f}%)")
print(f"logits of the 4-bit model against the float model on 32 reviews: largest difference "
      f"{quantization_shift:.3f}")

# %% [markdown]
# ## 3. Where the memory goes
#
# One training step holds the weights, the gradients of what trains, AdamW's two moments per trained
# weight, and the activations autograd keeps for the backward pass. `training_memory` adds the first
# three from the parameters and *measures* the fourth, by recording every tensor autograd saves during
# a forward pass. Full fine-tuning pays 16 bytes per weight (weight, gradient, two moments); LoRA pays 4
# per frozen weight; QLoRA about half a byte.
#
# The gradient must still pass through every frozen layer to reach the adapters below it:
# dL/dx = dL/dy W. A naive 4-bit layer would decode W in the forward pass and let autograd keep the
# decoded copy for this product, which would bring back a float32 copy of every weight. Our layers
# decode W a second time in the backward pass instead (`DequantizedMatmul`), as bitsandbytes does: the
# measured activations of QLoRA equal LoRA's. The counterfactual is measured below too.

# %%
batch_ids = ids[:16]
batch_mask = mask[:16]


def memory_of(model):
    model.train()
    return training_memory(model, lambda: model(batch_ids, batch_mask).sum())


full_model = copy.deepcopy(minilm)
lora_model = apply_lora(copy.deepcopy(minilm), LoRAConfig(r=R, alpha=ALPHA, targets="all-linear"))
memory = {"full": memory_of(full_model), "LoRA": memory_of(lora_model), "QLoRA": memory_of(qlora_model)}


def naive_forward(self, x):  # what a 4-bit layer would cost if autograd kept its decoded weight
    return F.linear(x, self.dequantize_weight(), self.bias)


Linear4bit.forward = naive_forward
memory["QLoRA, decoded copy kept"] = memory_of(qlora_model)
del Linear4bit.forward  # back to the inherited QuantLinear.forward
for name, m in memory.items():
    print(f"{name:>24}: " + ", ".join(f"{k} {v / MB:6.2f} MB" for k, v in m.as_dict().items()))
activations_equal = memory["QLoRA"].activations == memory["LoRA"].activations
frozen_ratio = memory["QLoRA"].frozen / memory["LoRA"].frozen
print(f"QLoRA's activations equal LoRA's: {activations_equal}; frozen weights: {frozen_ratio:.2f}x LoRA's")

fig, ax = plt.subplots(figsize=(8, 4))
parts = ["frozen", "trainable", "gradients", "optimizer", "activations"]
bottom = [0.0] * len(memory)
for part in parts:
    values = [m.as_dict()[part] / MB for m in memory.values()]
    ax.bar(list(memory), values, bottom=bottom, label=part)
    bottom = [b + v for b, v in zip(bottom, values)]
ax.set_ylabel("MB")
ax.set_title(f"MiniLM, one training step at batch {batch_ids.shape[0]} x {batch_ids.shape[1]} tokens")
ax.legend()
fig.tight_layout()
fig.savefig(OUT / "14_qlora_memory.png", dpi=100)

# %%
embedding_mb = sum(p.numel() * 4 for n, p in minilm.named_parameters() if "embeddings" in n) / MB
print(f"MiniLM's embeddings: {embedding_mb:.1f} MB of float32, kept as they are")

# %% [markdown]
# The embeddings stay in float32, as in the QLoRA paper (only linear layers are coded), and MiniLM's
# vocabulary of 30,522 pieces makes them half the model: that is why the frozen part is 0.59x of
# LoRA's and not 4.127/32. In a 7B Llama the embeddings are 3% of the weights. At this batch the
# activations are as large as the weights; at 7B parameters they are what remains once the weights are
# in 4 bits (benchmarks/qlora_memory.py).
#
# ## 4. Fine-tuning on IMDB
#
# The same job as lesson 07 twice, with the same targets (every linear layer), rank, data and schedule;
# only the storage of the frozen weights differs. The QLoRA paper reports that NF4 with double
# quantization matches 16-bit LoRA; here we measure it on a small budget.

# %%
data = FinetuneData(limit=N_TRAIN, test_limit=N_TEST, max_length=MAX_LENGTH, validation_size=0.1, seed=0)
train = TrainConfig(epochs=EPOCHS, batch_size=16, lr=LR, warmup=0.1, schedule="linear", weight_decay=0.01,
                    eval_batch_size=64, log_every_steps=1, progress=False, plot=False)
options = {"r": R, "alpha": ALPHA, "targets": ["all-linear"]}
finetuned = {}
for method in ("lora", "qlora"):
    start = time.time()
    finetuned[method] = run_imdb_finetune(FinetuneRunConfig(model="minilm", method=method, method_options=options,
                                                            data=data, train=train), OUT / f"14_{method}")
    r = finetuned[method]
    print(f"{method:>5}: test accuracy {r['test_accuracy']:.3f} (loss {r['test_loss']:.3f}) after {r['steps']} "
          f"steps; {r['train_seconds'] / r['steps']:.2f} s per step")
acc_lora, acc_qlora = finetuned["lora"]["test_accuracy"], finetuned["qlora"]["test_accuracy"]

# %% [markdown]
# A QLoRA step is slower on a CPU: every forward pass decodes every frozen weight and every backward
# pass decodes it again. On a GPU the decoding is a small kernel and the time goes to the matmuls; the
# trade is what lets a 65B model be fine-tuned on one 48 GB GPU (the paper's headline).
#
# ## 5. Merging
#
# After training, W' = dequant(W_nf4) + s B A can be computed once. Kept in float32 (`merge_qlora`),
# it gives the adapted model's outputs up to rounding, at the cost of a float model. Coded in NF4 again
# (`requantize=True`), every merged weight moves to its nearest 4-bit value, and here is the catch:
# dequant(W_nf4) lies exactly on the 4-bit grid, and a trained update s B A is mostly smaller than half
# a grid step, so most merged weights round back to the very code they started from. The update is
# rounded away, and what is left is close to the quantized base with a trained head. peft warns of this
# when merging into a 4-bit base ("may get different generations due to rounding errors"); the QLoRA
# authors merge into the 16-bit base and keep the result in 16 bits.

# %%
run = load_run(OUT / "14_qlora", merge=False)  # the pretrained model, quantized again, with the adapter
test = load_imdb("test", limit=N_TEST, seed=0)
examples = run.collate(run.encode(test["text"]))
labels = torch.tensor(test["label"])
with torch.no_grad():
    adapted = run.model(examples["input_ids"], examples["attention_mask"])
    requantized = merge_qlora(copy.deepcopy(run.model), requantize=True)
    requant_logits = requantized(examples["input_ids"], examples["attention_mask"])
    merged = merge_qlora(copy.deepcopy(run.model))
    merged_logits = merged(examples["input_ids"], examples["attention_mask"])
changed = total = 0
for name, layer in qlora_layers(run.model).items():  # the base codes against the merged, re-coded weights
    before_codes, after_codes = layer.base.quant4().codes(), requantized.get_submodule(name).quant4().codes()
    changed, total = changed + int((before_codes != after_codes).sum()), total + before_codes.numel()
codes_kept = 1 - changed / total
merge_diff = float((merged_logits - adapted).abs().max())
requant_diff = float((requant_logits - adapted).abs().max())
agreement = float((requant_logits.argmax(-1) == adapted.argmax(-1)).float().mean())
acc_requant = float((requant_logits.argmax(-1) == labels).float().mean())
print(f"float merge: largest logit difference {merge_diff:.1e}; no LoRA layer left: {not lora_layers(merged)}")
print(f"merged and coded in NF4 again: {codes_kept:.1%} of the 4-bit codes are the base's; largest logit "
      f"difference {requant_diff:.3f}, same prediction on {agreement:.1%} of {len(labels)} reviews, accuracy "
      f"{acc_requant:.3f} (unmerged {acc_qlora:.3f})")

# %% [markdown]
# ## What to remember
#
# * QLoRA = a frozen base in NF4 with double-quantized constants (4.127 bits per weight) + LoRA adapters
#   in float32 on every linear layer. Our codes and outputs are bitsandbytes' to the bit.
# * A fresh adapter starts the model as the *quantized* pretrained model, a little away from the float one.
# * The memory saved is in the frozen weights only (8x on the linear layers); gradients, optimizer state
#   and activations are LoRA's, provided the backward pass decodes the weights again instead of keeping a
#   float copy.
# * Trained with the same budget, QLoRA lands next to LoRA; a CPU pays for it in decoding time.
# * Merge into a float model (exact). Merging back into 4 bits rounds most of the update away.

# %%
print(f"RESULT: codes_equal={codes_equal} bnb_diff={bnb_diff:.2e} layer_error={layer_error:.4f} "
      f"trainable={counts.trainable} quantization_shift={quantization_shift:.4f} "
      f"activations_equal={activations_equal} frozen_ratio={frozen_ratio:.4f} "
      f"naive_extra_mb={(memory['QLoRA, decoded copy kept'].activations - memory['QLoRA'].activations) / MB:.2f} "
      f"acc_lora={acc_lora:.4f} acc_qlora={acc_qlora:.4f} merge_diff={merge_diff:.2e} "
      f"requant_diff={requant_diff:.4f} agreement={agreement:.4f} codes_kept={codes_kept:.4f} "
      f"acc_requant={acc_requant:.4f}")
