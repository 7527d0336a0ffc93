"""Text generation with a causal LM: greedy or sampled decoding over a preallocated KV cache.

    out = generate(model, input_ids, max_new_tokens=50)                        # greedy
    out = generate(model, ids, 50, attention_mask=mask, do_sample=True, temperature=0.8, top_p=0.9,
                   generator=torch.Generator().manual_seed(0))                 # nucleus sampling

One step: logits of the last position (B, V) -> repetition penalty -> (sampling only) temperature, top-k,
top-p -> argmax or a draw -> append, feed the new token alone through the model (its keys and values join
the cache). The processors are applied in Hugging Face's order, so greedy decoding and the filtered
distributions are the same as `model.generate`'s.

Batches of prompts are padded on the left (so every row's next token goes in the same column); position ids
come from the mask (cumsum - 1), so a padded row generates what it generates alone. A row that emits a stop
token is finished: it receives `pad_token_id` from then on, and generation ends when every row is finished.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from tunelab.core.collate import pad_sequences


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty (Keskar et al. 2019): a token already in the row has its logit divided by `penalty` if
    positive, multiplied if negative. logits: (B, V); seen: (B, L) the ids so far (prompt and generated)."""
    if penalty == 1.0:
        return logits
    scores = logits.gather(1, seen)  # (B, L)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(1, seen, scores)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits of each row (ties at the k-th value kept), the others -inf."""
    k = min(k, logits.shape[-1])
    kth = logits.topk(k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filtering (Holtzman et al. 2020): keep the smallest set of most likely tokens whose probability
    reaches p (at least one), the others -inf."""
    sorted_logits, order = logits.sort(dim=-1)  # ascending
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
    drop_sorted = cumulative <= 1 - p  # the low tail whose mass stays below 1 - p
    drop_sorted[:, -1] = False  # the most likely token always stays
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token_scores(logits: Tensor, seen: Tensor, *, do_sample: bool, temperature: float, top_k: int | None,
                      top_p: float | None, repetition_penalty: float) -> Tensor:
    """The processed scores of one step (B, V): argmax of them is the greedy token, softmax the sampling law."""
    logits = apply_repetition_penalty(logits.float(), seen, repetition_penalty)
    if do_sample:
        if temperature != 1.0:
            logits = logits / temperature
        if top_k:
            logits = top_k_filter(logits, top_k)
        if top_p is not None and top_p < 1.0:
            logits = top_p_filter(logits, top_p)
    return logits


def _check(input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, repetition_penalty):
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a (B, T) tensor of token ids, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must have input_ids' shape "
                             f"{tuple(input_ids.shape)}")
        if bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("prompts must be padded on the left: the last column of attention_mask has padding")
        if bool((attention_mask.sum(-1) == 0).any()):
            raise ValueError("a prompt has no tokens (its attention_mask row is all 0)")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")


@torch.no_grad()
def generate(model: nn.Module, input_ids: Tensor, max_new_tokens: int = 20, attention_mask: Tensor | None = None,
             *, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, repetition_penalty: float = 1.0,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True,
             streamer: Callable[[Tensor], None] | None = None) -> Tensor:
    """Continue each prompt by up to `max_new_tokens` tokens; returns (B, T + n) ids: the prompts (with their
    padding) followed by the new tokens, n <= max_new_tokens (fewer when every row stopped early).

    Args:
        model: a causal LM of `tunelab.core.decoder`, or one wrapped with prompt or prefix tuning: anything with
            `new_cache(B, length)` and forward(ids, attention_mask=, position_ids=, cache=) -> (B, T, V) logits.
        input_ids: (B, T) prompts, left-padded when their lengths differ. attention_mask: (B, T) 1 = token.
        do_sample: draw from the processed distribution (else greedy). temperature, top_k, top_p: sampling only.
        repetition_penalty: > 1 discourages tokens already in the row (prompt included).
        eos_token_id: stop token(s); None: the model config's eos_token_id. A row that emits one is finished.
        pad_token_id: what finished rows receive; None: the first stop token (or 0).
        generator: the random generator of the draws (reproducible sampling).
        use_cache: False recomputes the whole sequence every step (for checking the cache; slow).
        streamer: called after every step with the (B,) tokens just chosen (pad for finished rows).
    """
    _check(input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    config = getattr(model, "config", None)
    if eos_token_id is None:
        eos_token_id = getattr(config, "eos_token_id", None)
    stops = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (stops[0] if stops else 0)
    B, T = input_ids.shape
    device = input_ids.device
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.dtype)
    was_training = model.training
    model.eval()
    ids = torch.empty(B, T + max_new_tokens, dtype=input_ids.dtype, device=device)
    ids[:, :T] = input_ids
    full_mask = torch.ones(B, T + max_new_tokens, dtype=mask.dtype, device=device)
    full_mask[:, :T] = mask
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T + N): a row's positions skip its padding
    stop_ids = torch.tensor(stops, device=device, dtype=ids.dtype)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    padded = not bool(mask.all())  # without padding the model needs no mask (its fastest attention)
    cache = model.new_cache(B, T + max_new_tokens) if use_cache and max_new_tokens else None
    length = T
    try:
        step_ids, step_positions = input_ids, positions[:, :T]
        for _ in range(max_new_tokens):
            if cache is None:  # the whole sequence again
                step_ids, step_positions = ids[:, :length], positions[:, :length]
            step_mask = full_mask[:, :length] if padded else None  # (B, P + T): the cached positions too
            logits = model(step_ids, attention_mask=step_mask, position_ids=step_positions, cache=cache)[:, -1]
            scores = next_token_scores(logits, ids[:, :length], do_sample=do_sample, temperature=temperature,
                                       top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
            if do_sample:
                token = torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]  # (B,)
            else:
                token = scores.argmax(-1)  # (B,)
            token = torch.where(finished, torch.full_like(token, pad), token)
            ids[:, length] = token
            length += 1
            if streamer is not None:
                streamer(token)
            if len(stops):
                finished |= torch.isin(token, stop_ids)
                if bool(finished.all()):
                    break
            step_ids, step_positions = token[:, None], positions[:, length - 1:length]
    finally:
        model.train(was_training)
    return ids[:, :length]


def generate_text(model: nn.Module, tokenizer, prompts: str | Sequence[str], max_new_tokens: int = 50,
                  on_text: Callable[[str], None] | None = None, **options) -> list[str]:
    """The continuations of `prompts` as text (the prompt itself not included).

    The prompts are encoded with `tokenizer` (a `tunelab.core.hub.CausalTokenizer`), padded on the left with
    its pad id, and generated together; the tokenizer's EOS stops a row. `on_text`, with a single prompt,
    receives the text as it grows (piece by piece: streaming to a terminal). `options` go to `generate`.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("generate_text got no prompts")
    encoded = tokenizer.encode_batch(prompts)
    if any(len(ids) == 0 for ids in encoded):
        raise ValueError("a prompt encodes to no tokens; give at least one character")
    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in pad_sequences(encoded, tokenizer.pad_id, side="left"))
    options.setdefault("eos_token_id", tokenizer.eos_id)
    options.setdefault("pad_token_id", tokenizer.pad_id)
    new, shown = [], ""

    def stream(token: Tensor) -> None:  # the text so far, decoded again: BPE pieces may merge across tokens
        nonlocal shown
        new.append(int(token[0]))
        text = tokenizer.decode(new)
        if not text.endswith("\ufffd"):  # a multi-byte character still incomplete: wait for its last byte
            on_text(text[len(shown):])
            shown = text
    streamer = stream if on_text is not None and len(prompts) == 1 else None
    out = generate(model, ids, max_new_tokens, mask, streamer=streamer, **options)
    return [tokenizer.decode(row[ids.shape[1]:].tolist()) for row in out]
