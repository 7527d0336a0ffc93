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
# # Lesson 15 — Causal language models and generation
#
# The encoders of lessons 2-13 read a whole review at once. A **causal language model** reads left to right
# and predicts the next token; generation is that prediction fed back in. The models people fine-tune today
# (GPT-2, Llama 2/3, Mistral) are such decoders, and most of what makes them different from BERT fits in
# a few lines each:
#
# 1. the causal mask: position t sees positions 0..t only, so one forward trains T predictions at once;
# 2. our Llama against Hugging Face's `LlamaForCausalLM` with the same random weights, logit for logit;
# 3. rotary position embeddings (RoPE, Su et al. 2021, https://arxiv.org/abs/2104.09864): positions as
#    rotations of query/key pairs, so attention scores depend on the distance between tokens only;
# 4. grouped-query attention (GQA, Ainslie et al. 2023, https://arxiv.org/abs/2305.13245): fewer key/value
#    heads, a smaller cache;
# 5. the KV cache: what it saves, measured, and that it changes no token;
# 6. decoding: greedy, temperature, top-k and top-p (Holtzman et al. 2020, https://arxiv.org/abs/1904.09751)
#    on one next-token distribution.
#
# The code used: `tunelab/core/decoder.py` (`Llama`, `GPT`, `KVCache`, `apply_rotary`, `rotate_half`) and
# `tunelab/core/generate.py` (`generate`, `top_k_filter`, `top_p_filter`).

# %%
import os
import sys
import time
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:  # as a script: write figures to files, no window (a notebook shows them)
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import transformers

from tunelab.core.attention import make_attention_bias
from tunelab.core.decoder import Llama, LlamaConfig, apply_rotary, load_hf_state_dict
from tunelab.core.generate import generate, top_k_filter, top_p_filter

QUICK = os.environ.get("QUICK", "0") not in ("", "0")
# A model big enough that the cache matters: generation costs grow with the sequence without it.
MODEL = dict(vocab_size=512, hidden_size=128 if QUICK else 256, intermediate_size=344 if QUICK else 688,
             num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
PROMPT_LEN, NEW_TOKENS = 16, 96 if QUICK else 256
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
OUT = Path(os.environ.get("TUNELAB_LESSONS_OUT", HERE / "out"))
OUT.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)

# %% [markdown]
# ## 1. The causal mask
#
# Attention adds a bias to the scores: 0 where a query may look, a very negative number where it may not.
# For a decoder the allowed pairs form the lower triangle, so the output at position t is a function of
# tokens 0..t only. We check it the direct way: change the last token and see which logits move.

# %%
bias = make_attention_bias(None, causal=True, T=6, dtype=torch.float32)[0, 0]  # (T, T)
print("may query t look at key s?  (rows t, columns s)")
print((bias == 0).int())

config = LlamaConfig(**MODEL)
model = Llama(config).eval()
ids = torch.randint(0, config.vocab_size, (1, 12))
changed = ids.clone()
changed[0, -1] = (ids[0, -1] + 1) % config.vocab_size
with torch.no_grad():
    moved = (model(ids) - model(changed)).abs().amax(-1)[0]  # (T,) largest change of each position's logits
print("largest logit change per position:", [f"{m:.1e}" for m in moved.tolist()])
causal_ok = bool(moved[:-1].max() == 0) and bool(moved[-1] > 0)

# %% [markdown]
# Only the last position moved: nothing before it could see the changed token. That is what lets training
# score all T next-token predictions from one forward, with the labels shifted by one
# (`tunelab.core.evaluation.causal_lm_loss`).
#
# ## 2. Our Llama is Hugging Face's
#
# `LlamaForCausalLM` from a random config, its weights copied into ours by name (our module names are
# Hugging Face's, so the table is the identity; GPT-2's `Conv1D` weights would be transposed).

# %%
hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf_dict("LlamaForCausalLM"))).eval()
load_hf_state_dict(model, hf.state_dict())
ids = torch.randint(0, config.vocab_size, (2, 20))
with torch.no_grad():
    hf_diff = (model(ids) - hf(ids).logits).abs().max().item()
print(f"largest logit difference to Hugging Face: {hf_diff:.2e}")

# %% [markdown]
# ## 3. Rotary position embeddings
#
# Llama adds no position vectors. Each query and key is split into D/2 pairs (dimension i with i + D/2, the
# "half-split" layout of `rotate_half`), and pair i at position m is rotated by the angle m·θ_i,
# θ_i = 10000^(-2i/D). A rotation of q by mα and of k by nα changes q·k into a function of m - n: the score
# sees how far apart two tokens are, not where they are. We check it on random vectors.

# %%
D, theta = 64, 10000.0
inv_freq = 1.0 / theta ** (torch.arange(0, D, 2).float() / D)  # (D/2,)


def rotate(x, position):
    angles = torch.cat([position * inv_freq] * 2)  # (D,)
    return apply_rotary(x, angles.cos(), angles.sin())


q, k = torch.randn(D), torch.randn(D)
scores = {(m, n): float(rotate(q, m) @ rotate(k, n)) for m, n in ((3, 1), (10, 8), (105, 103), (5, 4))}
print("q·k at positions (m, n):", {key: round(v, 5) for key, v in scores.items()})
relative_ok = abs(scores[(3, 1)] - scores[(10, 8)]) < 1e-3 and abs(scores[(3, 1)] - scores[(105, 103)]) < 1e-3

distances = torch.arange(0, 512)
curve = torch.stack([rotate(q, d) @ q for d in distances.tolist()])  # a vector's score against itself, d apart
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
axes[0].semilogy(inv_freq, "o-", markersize=3)
axes[0].set(xlabel="pair i", ylabel="θ_i (radians per position)", title="RoPE: one frequency per pair")
axes[1].plot(distances, curve / curve[0])
axes[1].set(xlabel="distance m - n", ylabel="q·R(d)q / q·q", title="the same vector, d positions apart")
fig.tight_layout()
fig.savefig(OUT / "15_rope.png", dpi=100)

# %% [markdown]
# Equal distances give equal scores (to float rounding), wherever the pair sits. The fast pairs (small i)
# distinguish neighbours; the slow ones turn by a fraction of a radian over the whole context and carry
# long-range information: the curve on the right decays with distance, on average, without any learned
# parameter.
#
# ## 4. Grouped-query attention
#
# Our model has 8 query heads but 2 key/value heads: each K/V head serves 4 query heads. The weights shrink
# a little (k_proj and v_proj are 4x narrower); what shrinks most is the cache of keys and values that
# generation keeps for every token, layer and sequence.

# %%
def cache_bytes(kv_heads, tokens, batch=1):
    return 2 * config.num_hidden_layers * batch * kv_heads * tokens * config.head_dim * 4  # K and V, fp32


for kv in (8, 2, 1):
    print(f"{kv} key/value heads: {cache_bytes(kv, 4096, batch=8) / 2**20:7.1f} MiB of cache for 8 x 4096 tokens")
gqa_ratio = cache_bytes(8, 1) / cache_bytes(config.num_key_value_heads, 1)

# %% [markdown]
# ## 5. The KV cache
#
# Without a cache, generating token t runs the model over all t tokens again: O(T^2) work for T tokens. With
# one, each step runs the new token only and attends over the keys and values kept from before; the past is
# never recomputed. `generate(..., use_cache=False)` does the first, the default the second. Both must
# produce the same tokens.

# %%
prompt = torch.randint(0, config.vocab_size, (1, PROMPT_LEN))
times = {}
outputs = {}
for use_cache in (True, False):
    start = time.perf_counter()
    outputs[use_cache] = generate(model, prompt, NEW_TOKENS, eos_token_id=[], use_cache=use_cache)
    times[use_cache] = time.perf_counter() - start
same_tokens = bool(torch.equal(outputs[True], outputs[False]))
cache_speedup = times[False] / times[True]
print(f"{NEW_TOKENS} new tokens: cached {times[True]:.2f} s, uncached {times[False]:.2f} s "
      f"({cache_speedup:.1f}x); same tokens: {same_tokens}")
hf_tokens = hf.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
same_as_hf = bool(torch.equal(hf_tokens, outputs[True]))
print(f"greedy tokens equal Hugging Face's generate: {same_as_hf}")

# %% [markdown]
# The cached run does the same arithmetic on the new token, so the tokens agree; the speed-up grows with the
# length (the uncached cost per token grows linearly, the cached one barely). Batched prompts of different
# lengths are padded on the left, and the position ids count real tokens only, so a padded row generates
# what it would alone (tests/core/test_generate.py checks this against Hugging Face).
#
# ## 6. Choosing the next token
#
# The model gives a distribution over the vocabulary. Greedy takes its maximum. Sampling draws from it,
# after reshaping: temperature T divides the logits (T < 1 sharpens, T > 1 flattens), top-k keeps the k
# most likely tokens, top-p keeps the smallest set whose probability reaches p. We look at one step.

# %%
with torch.no_grad():
    logits = model(prompt)[:, -1]  # (1, V)
logits = logits * 4  # a random model is nearly uniform; sharpen it to look like a trained one
views = {"softmax(logits)": logits, "temperature 0.5": logits / 0.5, "top-k 20": top_k_filter(logits, 20),
         "top-p 0.5": top_p_filter(logits, 0.5)}
fig, axes = plt.subplots(1, 4, figsize=(14, 3.2), sharey=True)
order = logits[0].argsort(descending=True)
kept = {}
for ax, (name, view) in zip(axes, views.items()):
    p = view.softmax(-1)[0][order][:60]
    kept[name] = int(torch.isfinite(view).sum())
    ax.bar(range(60), p)
    ax.set(title=f"{name}: {kept[name]} tokens", xlabel="tokens, most likely first")
axes[0].set_ylabel("probability")
fig.tight_layout()
fig.savefig(OUT / "15_sampling.png", dpi=100)
print("tokens left by each filter:", kept)

# %% [markdown]
# ## What to remember
#
# * A decoder is an encoder with a causal mask and a next-token loss; generation is the forward fed back.
# * RoPE makes attention depend on relative positions; GQA shrinks the KV cache by H / H_kv.
# * The KV cache turns each step into one token's work and changes no output.
# * Greedy is deterministic; temperature, top-k and top-p trade diversity for safety.

# %%
print(f"RESULT: causal_ok={causal_ok} hf_diff={hf_diff:.2e} relative_ok={relative_ok} gqa_ratio={gqa_ratio:.1f} "
      f"same_tokens={same_tokens} same_as_hf={same_as_hf} cache_speedup={cache_speedup:.2f} "
      f"top_k_kept={kept['top-k 20']} top_p_kept={kept['top-p 0.5']}")
