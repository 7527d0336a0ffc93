"""Tiny random Hugging Face decoders and ours with the same weights (shared by the decoder and generation tests)."""

import torch
import transformers

from tunelab.core.decoder import GPT, GPTConfig, Llama, LlamaConfig, load_hf_state_dict

GPT_CONFIGS = {
    "gpt2": dict(),
    "gpt2-odd": dict(n_embd=36, n_head=3, n_layer=3, n_inner=52, vocab_size=61, activation_function="gelu_new"),
    "gpt2-relu": dict(n_layer=1, activation_function="relu", layer_norm_epsilon=1e-6),
}
LLAMA_CONFIGS = {
    "llama-gqa": dict(),
    "llama-mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "llama-mqa-theta": dict(num_attention_heads=6, num_key_value_heads=1, hidden_size=48, rope_theta=500000.0,
                            num_hidden_layers=3),
    "llama-head-dim": dict(hidden_size=40, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                           intermediate_size=70, rms_norm_eps=1e-5),
}


def gpt_pair(seed: int = 0, **overrides):
    """(hf GPT2LMHeadModel, our GPT) in eval mode with the same random weights."""
    config = GPTConfig.tiny(**overrides)
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config.to_hf_dict("GPT2LMHeadModel"))).eval()
    ours = GPT(config)
    load_hf_state_dict(ours, hf.state_dict())
    return hf, ours.eval()


def llama_pair(seed: int = 0, **overrides):
    """(hf LlamaForCausalLM, our Llama) in eval mode with the same random weights."""
    config = LlamaConfig.tiny(**overrides)
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf_dict("LlamaForCausalLM"))).eval()
    ours = Llama(config)
    load_hf_state_dict(ours, hf.state_dict())
    return hf, ours.eval()


def pair(name: str, seed: int = 0):
    if name in GPT_CONFIGS:
        return gpt_pair(seed, **GPT_CONFIGS[name])
    return llama_pair(seed, **LLAMA_CONFIGS[name])


ALL = [*GPT_CONFIGS, *LLAMA_CONFIGS]


def padded(lengths, vocab_size: int, left: bool = False, seed: int = 0):
    """Random ids (B, T) and their mask for rows of `lengths`, padded on the right (or the left) with id 0."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(3, vocab_size, (len(lengths), T), generator=g)
    positions = torch.arange(T)[None]
    lengths = torch.tensor(lengths)[:, None]
    mask = positions >= T - lengths if left else positions < lengths
    return ids.masked_fill(~mask, 0), mask.long()
