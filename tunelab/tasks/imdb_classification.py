"""IMDB sentiment classification with the from-scratch transformer, end to end.

load IMDB -> carve a validation split from train -> build a vocabulary on the training part only
-> tokenize once -> train with length-bucketed batches -> pick the best epoch on validation ->
report test accuracy. Everything a later `evaluate` or `predict` needs is saved in the run folder:

    RUN_DIR/run.json             data, model and training settings
    RUN_DIR/vocab.json           the vocabulary (`tunelab.core.text.Vocab`)
    RUN_DIR/metrics.jsonl        one JSON record per log/eval step
    RUN_DIR/curves.png           loss and accuracy curves
    RUN_DIR/checkpoints/{best,last}/   safetensors weights + training state
    RUN_DIR/results.json         test accuracy and what it cost
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from tunelab.core.checkpoint import load_model_weights
from tunelab.core.classifier import ClassifierConfig, TransformerClassifier
from tunelab.core.collate import ClassificationCollator, LengthBucketSampler, truncate
from tunelab.core.data import load_imdb, train_validation_split
from tunelab.core.text import Vocab, basic_english, build_vocab
from tunelab.core.train import TrainConfig, evaluate, train_model

LABELS = ("negative", "positive")

# The defaults of `tunelab train imdb` and of benchmarks/imdb_scratch.py: a narrow one-layer
# transformer that reads whole reviews overfits IMDB less than a deep one and trains in minutes.
# Hashed bigram embeddings (fastText's trick) give it word pairs; hiding 30% of the tokens while
# training (DAN's word dropout) keeps it from memorising rare words and pairs (most of the gain:
# benchmarks/RESULTS.md). token_dropout was chosen among 0, 0.15, 0.3 on the validation loss.
DEFAULT_MODEL = dict(d_model=32, n_heads=2, n_layers=1, d_ff=64, dropout=0.2, pooling="mean",
                     bigram_buckets=200_000, token_dropout=0.3)
DEFAULT_TRAIN = dict(epochs=4, batch_size=32, lr=1e-3, weight_decay=0.01, warmup=0.06, schedule="linear")


@dataclass
class DataConfig:
    """Which reviews are used and how they become token ids.

    Args:
        data_dir: IMDB folder (parquet files or `aclImdb/`); None: `$TUNELAB_DATA_DIR`, then the hub.
        limit: class-balanced subset of the train split (before the validation split); None = all.
        test_limit: class-balanced subset of the test split; None = all 25,000 reviews.
        validation_size: fraction (or count) of train held out for model selection; test is never used.
        vocab_size: most tokens in the vocabulary, the specials <pad> and <unk> included.
        min_freq: least number of training occurrences for a token to get its own id.
        max_length: most tokens per review; longer ones are cut by `truncation`.
        truncation: "head", "tail" or "head+tail" (Sun et al. 2019).
        seed: chooses the subsets and the validation split.
    """

    data_dir: str | None = None
    limit: int | None = None
    test_limit: int | None = None
    validation_size: float = 0.1
    vocab_size: int = 30000
    min_freq: int = 2
    max_length: int = 512
    truncation: str = "head+tail"
    seed: int = 0


@dataclass
class ImdbRunConfig:
    """A whole IMDB classification job: data, model (ClassifierConfig fields but vocab_size) and training."""

    data: DataConfig = field(default_factory=DataConfig)
    model: dict = field(default_factory=lambda: dict(DEFAULT_MODEL))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**DEFAULT_TRAIN))

    def to_dict(self) -> dict:
        return {"data": asdict(self.data), "model": dict(self.model), "train": self.train.to_dict()}

    @classmethod
    def from_dict(cls, values: dict) -> "ImdbRunConfig":
        """Build from {"data": {...}, "model": {...}, "train": {...}} over the defaults; unknown keys raise."""
        unknown = sorted(set(values) - {"data", "model", "train"})
        if unknown:
            raise ValueError(f"unknown config sections {unknown}; expected 'data', 'model' and 'train'")
        return cls(
            data=DataConfig(**known_settings(DataConfig, values.get("data", {}), "data")),
            model={**DEFAULT_MODEL, **values.get("model", {})},
            train=TrainConfig(**{**DEFAULT_TRAIN, **known_settings(TrainConfig, values.get("train", {}), "train")}),
        )


def known_settings(cls, values: dict, section: str) -> dict:
    """`values` if every key is a field of the dataclass `cls`, else a ValueError naming the unknown ones."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {section} settings {unknown}; known: {sorted(names)}")
    return values


def tokenize(texts, vocab: Vocab, max_length: int, truncation: str) -> list[list[int]]:
    """basic_english tokens -> vocabulary ids, truncated to `max_length`."""
    return [truncate(vocab(basic_english(text)), max_length, truncation) or [vocab["<unk>"]] for text in texts]


def encode_examples(dataset, vocab: Vocab, max_length: int, truncation: str = "head+tail") -> list[dict]:
    """Rows with `text` and `label` -> [{"input_ids": [...], "label": int}], ready for the collator."""
    ids = tokenize(dataset["text"], vocab, max_length, truncation)
    return [{"input_ids": x, "label": int(y)} for x, y in zip(ids, dataset["label"])]


def run_imdb_classification(config: ImdbRunConfig, out_dir: str | Path) -> dict:
    """Train the from-scratch classifier on IMDB, evaluate it on the test split, save the run.

    Returns the results dict also written to `out_dir/results.json`.
    """
    out_dir = Path(out_dir)
    data, start = config.data, time.time()
    full_train = load_imdb("train", data.data_dir, limit=data.limit, seed=data.seed)
    train_set, val_set = train_validation_split(full_train, data.validation_size, seed=data.seed)
    vocab = build_vocab(train_set["text"], min_freq=data.min_freq, max_size=data.vocab_size)
    train_examples, val_examples = (encode_examples(split, vocab, data.max_length, data.truncation)
                                    for split in (train_set, val_set))

    model_config = ClassifierConfig(**{"max_len": data.max_length, **config.model, "vocab_size": len(vocab)})
    torch.manual_seed(config.train.seed)  # the initial weights are part of what the seed fixes
    model = TransformerClassifier(model_config)
    collate = ClassificationCollator(max_length=data.max_length, pad_id=vocab["<pad>"], truncation=data.truncation)
    lengths = [len(e["input_ids"]) for e in train_examples]
    sampler = LengthBucketSampler(lengths, config.train.batch_size, seed=config.train.seed)

    out_dir.mkdir(parents=True, exist_ok=True)
    vocab.save(out_dir / "vocab.json")
    run_record = {**config.to_dict(), "model": model_config.to_dict()}
    run_record["train"]["out_dir"] = str(out_dir)
    (out_dir / "run.json").write_text(json.dumps(run_record, indent=2))

    train_config = TrainConfig(**{**asdict(config.train), "out_dir": out_dir})
    result = train_model(model, train_examples, val_examples, collate_fn=collate, config=train_config,
                         batch_sampler=sampler)
    train_seconds = time.time() - start
    if (out_dir / "checkpoints" / "best").exists():
        load_model_weights(model, out_dir / "checkpoints" / "best")

    test_set = load_imdb("test", data.data_dir, limit=data.test_limit, seed=data.seed)
    test_examples = encode_examples(test_set, vocab, data.max_length, data.truncation)
    test = evaluate(model, test_examples, collate_fn=collate, batch_size=train_config.eval_batch_size or 128,
                    device=train_config.device, progress=train_config.progress, sort_by_length=True)
    results = {
        "test_accuracy": test["accuracy"], "test_loss": test["loss"], "test_examples": test["n"],
        "best_validation": result.best_metric, "best_step": result.best_step, "steps": result.steps,
        "train_examples": len(train_examples), "validation_examples": len(val_examples),
        "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(vocab),
        "train_seconds": round(train_seconds, 1), "completed": result.completed,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


@dataclass
class ClassifierRun:
    """A saved run loaded back: the model (best weights, eval mode), its vocabulary and settings."""

    model: TransformerClassifier
    vocab: Vocab
    data: DataConfig
    collate: ClassificationCollator

    def encode(self, texts) -> list[dict]:
        ids = tokenize(texts, self.vocab, self.data.max_length, self.data.truncation)
        return [{"input_ids": x} for x in ids]


def load_run(run_dir: str | Path, device: str | None = None) -> ClassifierRun:
    """Rebuild the model of a run folder and load its best (else last) weights.

    Runs of `tunelab finetune` are handed to `tunelab.tasks.imdb_finetune.load_run`, whose result has
    the same `model`, `data`, `collate` and `encode`, so `evaluate_run` and `predict` serve both.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a TuneLab run folder: it has no run.json "
                                "(make one with `tunelab train imdb --out DIR`)")
    record = json.loads((run_dir / "run.json").read_text())
    if record.get("task") == "imdb-finetune":  # a fine-tuned pretrained encoder: its own loader
        from tunelab.tasks.imdb_finetune import load_run as load_finetune_run

        return load_finetune_run(run_dir, device)
    data = DataConfig(**record["data"])
    vocab = Vocab.load(run_dir / "vocab.json")
    model = TransformerClassifier(ClassifierConfig.from_dict(record["model"]))
    checkpoints = run_dir / "checkpoints"
    best = checkpoints / "best" if (checkpoints / "best").exists() else checkpoints / "last"
    load_model_weights(model, best)
    model.to(device or "cpu").eval()
    collate = ClassificationCollator(max_length=data.max_length, pad_id=vocab["<pad>"], truncation=data.truncation)
    return ClassifierRun(model, vocab, data, collate)


def evaluate_run(run_dir, split: str = "test", limit: int | None = None, data_dir: str | None = None,
                 batch_size: int = 128, device: str | None = None, progress: bool = True) -> dict:
    """Accuracy and loss of a saved run on an IMDB split ("test", or "train" for a sanity check)."""
    run = load_run(run_dir, device)
    dataset = load_imdb(split, data_dir or run.data.data_dir, limit=limit, seed=run.data.seed)
    examples = [{**x, "label": y} for x, y in zip(run.encode(dataset["text"]), dataset["label"])]
    return evaluate(run.model, examples, collate_fn=run.collate, batch_size=batch_size, device=device,
                    progress=progress, sort_by_length=True)


@torch.no_grad()
def predict(run_dir, texts: list[str], device: str | None = None) -> list[dict]:
    """Sentiment of each text: {"label": "positive"|"negative", "probability": p of that label}."""
    if isinstance(texts, str):
        texts = [texts]
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError("predict() needs one or more non-empty review texts")
    run = load_run(run_dir, device)
    batch = run.collate(run.encode(texts))
    probs = torch.softmax(run.model(**{k: v.to(device or "cpu") for k, v in batch.items()}), dim=-1)  # (B, 2)
    return [{"label": LABELS[int(p.argmax())], "probability": float(p.max())} for p in probs]
