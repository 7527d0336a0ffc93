"""Causal-LM pretraining on IMDB text: a small Llama learns to continue movie reviews, from scratch.

Texts: the `unsupervised` split (50,000 unlabelled reviews) and the `train` split's texts (labels unused); the
test split is never read. A byte-level BPE tokenizer is trained on them; a held-out share of the reviews is
kept for validation. Each side's reviews are tokenized, joined with <|endoftext|> after every review (the
document boundary the model learns to predict) and cut into blocks of `block_size` tokens: packing, so no
position is padding (Raffel et al. 2020, T5, section 3.1.2 packs the same way). The loss is next-token
cross-entropy through `train_model`; perplexity = exp(validation loss). Every evaluation also writes sample
continuations of fixed prompts to samples.jsonl. The run folder is a Hugging Face LlamaForCausalLM folder.

    RUN_DIR/config.json, model.safetensors, tokenizer.json   (AutoModelForCausalLM loads them)
    RUN_DIR/run.json ({"task": "imdb-lm", ...}), metrics.jsonl, samples.jsonl, curves.png, checkpoints/, results.json
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tunelab.core.collate import LanguageModelingCollator
from tunelab.core.data import load_imdb
from tunelab.core.decoder import Llama, LlamaConfig
from tunelab.core.evaluation import causal_lm_loss
from tunelab.core.generate import generate_text
from tunelab.core.hub import CausalTokenizer, load_pretrained, save_pretrained
from tunelab.core.text import BYTE_BPE_SPECIALS, train_tokenizer
from tunelab.core.train import TrainConfig, evaluate, train_model
from tunelab.tasks import runs
from tunelab.tasks.runs import config_sections

TASK = "imdb-lm"
EOS, PAD = BYTE_BPE_SPECIALS
# A small Llama a CPU can pretrain on IMDB in hours: 6 layers, d=384, GQA 6/2 (about 10M weights + embeddings).
DEFAULT_MODEL = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
                     intermediate_size=1024, max_position_embeddings=1024, tie_word_embeddings=True)
DEFAULT_TRAIN = dict(epochs=1, batch_size=32, lr=1e-3, weight_decay=0.1, warmup=0.03, schedule="cosine",
                     metric="loss", metric_mode="min", save_every_steps=100, eval_every_steps=500,
                     eval_batch_size=64, max_grad_norm=1.0)
PROMPTS = ("This movie was", "I have never seen", "The acting in this film", "My favorite scene")


@dataclass
class LmData:
    """Which texts, and how they become blocks.

    Args:
        data_dir: IMDB folder; None: `$TUNELAB_DATA_DIR`, then the hub.
        limit: use at most this many reviews (a seeded sample of unsupervised + train); None: all 75,000.
        validation_size: fraction (or count) of the reviews held out for validation perplexity.
        block_size: tokens per training sequence.
        vocab_size: byte-level BPE vocabulary size.
        sample_tokens: new tokens of each sample continuation written at an evaluation (0: none).
        seed: chooses the texts and the split.
    """

    data_dir: str | None = None
    limit: int | None = None
    validation_size: float = 0.01
    block_size: int = 256
    vocab_size: int = 8192
    sample_tokens: int = 40
    seed: int = 0


@dataclass
class LmRunConfig:
    data: LmData = field(default_factory=LmData)
    model: dict = field(default_factory=lambda: dict(DEFAULT_MODEL))  # LlamaConfig fields
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**DEFAULT_TRAIN))

    def to_dict(self) -> dict:
        return {"task": TASK, "data": asdict(self.data), "model": dict(self.model), "train": self.train.to_dict()}

    @classmethod
    def from_dict(cls, values: dict) -> "LmRunConfig":
        sections = config_sections(values, {"data": LmData, "model": LlamaConfig, "train": TrainConfig})
        return cls(data=LmData(**sections["data"]), model={**DEFAULT_MODEL, **sections["model"]},
                   train=TrainConfig(**{**DEFAULT_TRAIN, **sections["train"]}))


def imdb_texts(data: LmData) -> list[str]:
    """Unsupervised and training reviews (never test): all of them, or a seeded sample of `data.limit`."""
    texts = list(load_imdb("unsupervised", data.data_dir)["text"]) + list(load_imdb("train", data.data_dir)["text"])
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(data.seed)).tolist()
    return [texts[i] for i in order[: data.limit]]


def pack(tokenizer: CausalTokenizer, texts, block_size: int) -> list[dict]:
    """The texts' tokens, each text followed by EOS, concatenated and cut into blocks of `block_size`; the
    last, partial block is dropped."""
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2 (a token and the one it predicts), got {block_size}")
    stream = []
    for ids in tokenizer.encode_batch(texts, add_special_tokens=False):
        stream += ids
        stream.append(tokenizer.eos_id)
    n = len(stream) // block_size
    if n == 0:
        raise ValueError(f"the texts hold {len(stream)} tokens: not one block of {block_size}")
    tokens = torch.tensor(stream[: n * block_size]).view(n, block_size)
    return [{"input_ids": row} for row in tokens.tolist()]


class SampleWriter:
    """After every `every`-th optimizer step: continue PROMPTS greedily and append them to samples.jsonl."""

    def __init__(self, model, tokenizer, out_dir: Path, every: int | None, n_tokens: int):
        self.model, self.tokenizer, self.every, self.n_tokens = model, tokenizer, every, n_tokens
        self.file = out_dir / "samples.jsonl"

    def __call__(self, step: int) -> None:
        if self.every and self.n_tokens and step % self.every == 0:
            self.write(step)

    def write(self, step: int) -> list[str]:
        """Generate and record the samples of `step`, replacing any of that step or later (a resumed run
        re-writes the steps after its checkpoint)."""
        texts = generate_text(self.model, self.tokenizer, list(PROMPTS), self.n_tokens, repetition_penalty=1.2)
        self.model.train()
        kept = []
        if self.file.is_file():
            kept = [line for line in self.file.read_text().splitlines() if json.loads(line)["step"] < step]
        record = json.dumps({"step": step, "samples": [p + t for p, t in zip(PROMPTS, texts)]})
        self.file.write_text("".join(line + "\n" for line in [*kept, record]))
        return texts


def run_imdb_lm(config: LmRunConfig, out_dir: str | Path) -> dict:
    """Pretrain a Llama on IMDB text; returns (and writes to results.json) its validation perplexity."""
    out_dir, data, start = Path(out_dir), config.data, time.time()
    texts = imdb_texts(data)
    if len(texts) < 2:
        raise ValueError(f"pretraining needs at least 2 IMDB texts, got {len(texts)}")
    n_val = int(data.validation_size * len(texts)) if data.validation_size < 1 else int(data.validation_size)
    if not 0 < n_val < len(texts):
        raise ValueError(f"validation_size={data.validation_size} leaves {n_val} of {len(texts)} reviews "
                         "for validation")
    val_texts, train_texts = texts[:n_val], texts[n_val:]
    saved = out_dir / "tokenizer.json"
    if config.train.resume and saved.is_file():
        tokenizer = CausalTokenizer.from_folder(out_dir)  # the ids the checkpoint was trained with
    else:
        tokenizer = CausalTokenizer(train_tokenizer(train_texts, kind="byte_bpe", vocab_size=data.vocab_size), EOS, PAD)
        out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save(out_dir)
    train_blocks, val_blocks = pack(tokenizer, train_texts, data.block_size), pack(tokenizer, val_texts,
                                                                                 data.block_size)
    model_config = LlamaConfig(**{**config.model, "vocab_size": tokenizer.vocab_size, "bos_token_id": tokenizer.eos_id,
                                  "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id,
                                  "max_position_embeddings": max(data.block_size,
                                                                 config.model.get("max_position_embeddings", 0))})
    torch.manual_seed(config.train.seed)
    model = Llama(model_config)
    collate = LanguageModelingCollator(pad_id=tokenizer.pad_id, max_length=data.block_size)

    runs.write_record(out_dir, {**config.to_dict(), "model": asdict(model_config)})
    train_config = TrainConfig(**{**asdict(config.train), "out_dir": out_dir})
    samples = SampleWriter(model, tokenizer, out_dir, train_config.eval_every_steps, data.sample_tokens)
    result = train_model(model, train_blocks, val_blocks, collate_fn=collate, config=train_config,
                         loss_fn=causal_lm_loss, after_step=samples)
    runs.load_best(model, out_dir)
    save_pretrained(model, out_dir, tokenizer)
    final = evaluate(model, val_blocks, collate_fn=collate, loss_fn=causal_lm_loss,
                     batch_size=train_config.eval_batch_size or 64)
    texts_out = samples.write(result.steps) if data.sample_tokens else []
    results = {"val_loss": final["loss"], "val_perplexity": math.exp(final["loss"]),
               "val_next_token_accuracy": final["accuracy"], "val_tokens": final["n"],
               "train_blocks": len(train_blocks), "validation_blocks": len(val_blocks),
               "texts": len(texts), "train_tokens_seen": result.steps * train_config.batch_size * data.block_size,
               "steps": result.steps, "parameters": sum(p.numel() for p in model.parameters()),
               "train_seconds": result.history[-1]["time"] if result.history else round(time.time() - start, 1),
               "samples": [p + t for p, t in zip(PROMPTS, texts_out)], "completed": result.completed}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


@dataclass
class LmRun:
    """A saved LM run loaded back: the Llama (best weights, eval mode), its tokenizer, its data settings."""

    model: Llama
    tokenizer: CausalTokenizer
    data: LmData


def load_run(run_dir: str | Path, device: str | None = None) -> LmRun:
    """The causal LM a run saved (a Hugging Face LlamaForCausalLM folder), with its tokenizer."""
    record = runs.read_record(run_dir)
    if not (Path(run_dir) / "model.safetensors").is_file():
        raise FileNotFoundError(f"{run_dir} has no model.safetensors: the run did not finish training")
    model, tokenizer = load_pretrained(run_dir)
    return LmRun(model.to(device or "cpu").eval(), tokenizer, LmData(**record["data"]))


runs.register(TASK, load_run, labels=None, hint="generate text with it: `tunelab generate RUN_DIR \"prompt\"`")
