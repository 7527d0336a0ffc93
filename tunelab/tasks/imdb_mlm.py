"""Self-supervised pretraining on IMDB text: a small BERT learns masked language modelling from scratch.

Texts: the `unsupervised` split (50,000 unlabelled reviews) and the `train` split's texts (labels
unused); the test split is never read. A WordPiece vocabulary is trained on those texts, each review is
cut into chunks of `max_length - 2` pieces, and every chunk becomes `[CLS] chunk [SEP]`. The model
(`BertForMaskedLM`, randomly initialised, its output bias at the log piece frequencies) predicts the 15%
of pieces `MaskedLMCollator` hides (80/10/10 rule, Devlin et al. 2019). The run folder is a Hugging Face
BertForMaskedLM folder, so it can be fine-tuned for classification with `tunelab finetune imdb --model RUN_DIR`.

    RUN_DIR/config.json, model.safetensors, tokenizer.json   (AutoModelForMaskedLM loads them)
    RUN_DIR/run.json ({"task": "imdb-mlm", ...}), metrics.jsonl, curves.png, checkpoints/, results.json
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tokenizers import processors

from tunelab.core.bert import BertConfig, BertForMaskedLM
from tunelab.core.collate import MaskedLMCollator
from tunelab.core.data import load_imdb
from tunelab.core.hub import WordPieceTokenizer, load_pretrained, save_pretrained
from tunelab.core.text import train_tokenizer
from tunelab.core.train import TrainConfig, evaluate, train_model
from tunelab.tasks import runs
from tunelab.tasks.runs import config_sections

TASK = "imdb-mlm"
# A BERT-mini-sized encoder (Turc et al. 2019, "Well-Read Students Learn Better": L4 H256) that a CPU can
# pretrain on a slice of IMDB, and BERT's pretraining recipe scaled to it (lr 5e-4 for a small model).
DEFAULT_MODEL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
DEFAULT_TRAIN = dict(epochs=1, batch_size=64, lr=5e-4, weight_decay=0.01, warmup=0.06, schedule="linear",
                     metric="loss", metric_mode="min", save_every_steps=200, eval_batch_size=128)


@dataclass
class MlmData:
    """Which texts, and how they become chunks.

    Args:
        data_dir: IMDB folder; None: `$TUNELAB_DATA_DIR`, then the hub.
        limit: use at most this many reviews (unsupervised first, then train); None: all 75,000.
        validation_size: fraction (or count) of the chunks held out to measure MLM loss and accuracy.
        max_length: pieces per chunk, [CLS] and [SEP] included.
        min_chunk: a review's last chunk is dropped when shorter than this (a short review is kept whole).
        vocab_size: WordPiece vocabulary size. mlm_probability: share of pieces to predict.
        seed: chooses the texts, the split, the validation masks.
    """

    data_dir: str | None = None
    limit: int | None = None
    validation_size: float = 0.02
    max_length: int = 128
    min_chunk: int = 16
    vocab_size: int = 16000
    mlm_probability: float = 0.15
    seed: int = 0


@dataclass
class MlmRunConfig:
    data: MlmData = field(default_factory=MlmData)
    model: dict = field(default_factory=lambda: dict(DEFAULT_MODEL))  # BertConfig fields
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**DEFAULT_TRAIN))

    def to_dict(self) -> dict:
        return {"task": TASK, "data": asdict(self.data), "model": dict(self.model), "train": self.train.to_dict()}

    @classmethod
    def from_dict(cls, values: dict) -> "MlmRunConfig":
        sections = config_sections(values, {"data": MlmData, "model": BertConfig, "train": TrainConfig})
        return cls(data=MlmData(**sections["data"]), model={**DEFAULT_MODEL, **sections["model"]},
                   train=TrainConfig(**{**DEFAULT_TRAIN, **sections["train"]}))


def imdb_texts(data: MlmData) -> list[str]:
    """Unsupervised reviews, then training reviews (never test), at most `data.limit` of them."""
    texts = list(load_imdb("unsupervised", data.data_dir)["text"])
    if data.limit is None or len(texts) < data.limit:
        texts += list(load_imdb("train", data.data_dir)["text"])
    if data.limit is not None:
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(data.seed))[: data.limit]
        texts = [texts[i] for i in order.tolist()]
    return texts


def bert_tokenizer(texts, vocab_size: int) -> WordPieceTokenizer:
    """A WordPiece tokenizer trained on `texts` that adds [CLS] ... [SEP] like BERT's."""
    raw = train_tokenizer(texts, kind="wordpiece", vocab_size=vocab_size)
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", raw.token_to_id("[CLS]")), ("[SEP]", raw.token_to_id("[SEP]"))])
    return WordPieceTokenizer(raw)


def chunk_reviews(tokenizer: WordPieceTokenizer, texts, max_length: int, min_chunk: int) -> list[dict]:
    """Each review's pieces cut into `[CLS] + (max_length - 2) pieces + [SEP]` chunks."""
    size = max_length - 2
    if size < 1:
        raise ValueError(f"max_length={max_length} leaves no room for text beside [CLS] and [SEP]")
    if min_chunk > size:
        raise ValueError(f"min_chunk={min_chunk} is longer than a chunk ({size} pieces at max_length={max_length}): "
                         "every chunk after a review's first would be dropped")
    chunks = []
    for ids in tokenizer.encode_batch(texts, add_special_tokens=False):
        for start in range(0, len(ids), size):
            piece = ids[start:start + size]
            if start and len(piece) < min_chunk:
                break
            chunks.append({"input_ids": [tokenizer.cls_id, *piece, tokenizer.sep_id]})
    return chunks


def piece_counts(chunks: list[dict], vocab_size: int) -> torch.Tensor:
    """(vocab_size,) how often each piece occurs in the chunks, [CLS] and [SEP] left out."""
    pieces = torch.tensor([i for chunk in chunks for i in chunk["input_ids"][1:-1]], dtype=torch.long)
    return torch.bincount(pieces, minlength=vocab_size)


def run_imdb_mlm(config: MlmRunConfig, out_dir: str | Path) -> dict:
    """Pretrain a BertForMaskedLM on IMDB text; returns (and writes to results.json) its validation figures."""
    out_dir, data, start = Path(out_dir), config.data, time.time()
    texts = imdb_texts(data)
    if not texts:
        raise ValueError("no IMDB texts to pretrain on")
    saved = out_dir / "tokenizer.json"
    if config.train.resume and saved.is_file():
        tokenizer = WordPieceTokenizer.from_file(saved)  # the ids the checkpoint was trained with
    else:
        # HF tokenizers' trainer may number the same pieces differently from one process to the next,
        # so the tokenizer is saved before training and a resumed run reads it back instead of retraining.
        tokenizer = bert_tokenizer(texts, data.vocab_size)
        out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save(out_dir)
    chunks = chunk_reviews(tokenizer, texts, data.max_length, data.min_chunk)
    order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(data.seed)).tolist()
    n_val = int(data.validation_size * len(chunks)) if data.validation_size < 1 else int(data.validation_size)
    if not 0 < n_val < len(chunks):
        raise ValueError(f"validation_size={data.validation_size} leaves {n_val} of {len(chunks)} chunks "
                         "for validation")
    val_chunks, train_chunks = [chunks[i] for i in order[:n_val]], [chunks[i] for i in order[n_val:]]

    model_config = BertConfig(**{**config.model, "vocab_size": tokenizer.vocab_size,
                                 "pad_token_id": tokenizer.pad_id,
                                 "max_position_embeddings": max(data.max_length, config.model.get(
                                     "max_position_embeddings", 512))})
    torch.manual_seed(config.train.seed)
    model = BertForMaskedLM(model_config)
    model.init_decoder_bias(piece_counts(train_chunks, tokenizer.vocab_size))  # starts at the unigram line
    options = dict(mask_id=tokenizer.mask_id, vocab_size=tokenizer.vocab_size, special_ids=tokenizer.special_ids,
                   pad_id=tokenizer.pad_id, max_length=data.max_length, mlm_probability=data.mlm_probability)
    train_collate = MaskedLMCollator(**options)
    val_collate = MaskedLMCollator(**options, seed=data.seed)  # the same masks at every evaluation

    runs.write_record(out_dir, {**config.to_dict(), "model": asdict(model_config)})
    train_config = TrainConfig(**{**asdict(config.train), "out_dir": out_dir})
    result = train_model(model, train_chunks, val_chunks, collate_fn=train_collate, config=train_config,
                         eval_collate_fn=val_collate)
    runs.load_best(model, out_dir)
    save_pretrained(model, out_dir, tokenizer)
    final = evaluate(model, val_chunks, collate_fn=val_collate, batch_size=train_config.eval_batch_size or 128)
    results = {"val_mlm_loss": final["loss"], "val_mlm_accuracy": final["accuracy"], "val_masked_tokens": final["n"],
               "train_chunks": len(train_chunks), "validation_chunks": len(val_chunks), "texts": len(texts),
               "train_tokens_seen": result.steps * train_config.batch_size * data.max_length,
               "steps": result.steps, "parameters": sum(p.numel() for p in model.parameters()),
               "train_seconds": result.history[-1]["time"] if result.history else round(time.time() - start, 1),
               "completed": result.completed}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


@dataclass
class MlmRun:
    """A saved MLM run loaded back: the BertForMaskedLM (best weights, eval mode), its tokenizer, data settings."""

    model: BertForMaskedLM
    tokenizer: WordPieceTokenizer
    data: MlmData


def load_run(run_dir: str | Path, device: str | None = None) -> MlmRun:
    """The masked language model a run saved (a Hugging Face BertForMaskedLM folder), with its tokenizer."""
    record = runs.read_record(run_dir)
    if not (Path(run_dir) / "model.safetensors").is_file():
        raise FileNotFoundError(f"{run_dir} has no model.safetensors: the run did not finish training")
    model, tokenizer = load_pretrained(run_dir, task="mlm")
    return MlmRun(model.to(device or "cpu").eval(), tokenizer, MlmData(**record["data"]))


runs.register(TASK, load_run, labels=None,
              hint="fine-tune it into one with `tunelab finetune imdb --model RUN_DIR`")
