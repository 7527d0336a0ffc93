"""IMDB sentiment classification with the from-scratch transformer, end to end.

load IMDB -> carve a validation split from train -> build a vocabulary on the training part only
-> tokenize once -> train with length-bucketed batches -> pick the best epoch on validation ->
report test accuracy. Everything a later `evaluate` or `predict` needs is saved in the run folder:

    RUN_DIR/run.json             {"task": "imdb-classification", data, model and training settings}
    RUN_DIR/vocab.json           the vocabulary (`tunelab.core.text.Vocab`)
    RUN_DIR/metrics.jsonl        one JSON record per log/eval step
    RUN_DIR/curves.png           loss and accuracy curves
    RUN_DIR/checkpoints/{best,last}/   safetensors weights + training state
    RUN_DIR/results.json         test accuracy and what it cost
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tunelab.core.checkpoint import load_model_weights
from tunelab.core.classifier import ClassifierConfig, TransformerClassifier
from tunelab.core.collate import ClassificationCollator, LengthBucketSampler, truncate
from tunelab.core.data import load_imdb, train_validation_split
from tunelab.core.text import Vocab, basic_english, build_vocab
from tunelab.core.train import TrainConfig, train_model
from tunelab.tasks import runs
from tunelab.tasks.runs import config_sections

TASK = "imdb-classification"

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
        return {"task": TASK, "data": asdict(self.data), "model": dict(self.model), "train": self.train.to_dict()}

    @classmethod
    def from_dict(cls, values: dict) -> "ImdbRunConfig":
        """Build from {"data": {...}, "model": {...}, "train": {...}} over the defaults; unknown keys raise."""
        sections = config_sections(values, {"data": DataConfig, "model": ClassifierConfig, "train": TrainConfig})
        return cls(
            data=DataConfig(**sections["data"]),
            model={**DEFAULT_MODEL, **sections["model"]},
            train=TrainConfig(**{**DEFAULT_TRAIN, **sections["train"]}),
        )


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

    runs.write_record(out_dir, {**config.to_dict(), "model": model_config.to_dict()})
    vocab.save(out_dir / "vocab.json")

    train_config = TrainConfig(**{**asdict(config.train), "out_dir": out_dir})
    result = train_model(model, train_examples, val_examples, collate_fn=collate, config=train_config,
                         batch_sampler=sampler)
    train_seconds = time.time() - start
    runs.load_best(model, out_dir)

    test_set = load_imdb("test", data.data_dir, limit=data.test_limit, seed=data.seed)
    test_examples = encode_examples(test_set, vocab, data.max_length, data.truncation)
    figures = {"train_examples": len(train_examples), "validation_examples": len(val_examples),
               "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(vocab),
               "train_seconds": round(train_seconds, 1)}
    return runs.finish_run(model, out_dir, result, train_config, test_examples, collate, figures, eval_batch_size=128)


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
    """Rebuild the model of a from-scratch run folder and load its best (else last) weights.
    `tunelab.tasks.runs.load_run` calls this for runs of this task, and loads any other kind of run too."""
    run_dir = Path(run_dir)
    record = runs.read_record(run_dir)
    if record["task"] != TASK:
        raise ValueError(f"{run_dir} is an {record['task']} run, not a from-scratch classifier; "
                         "load it with tunelab.tasks.runs.load_run")
    data = DataConfig(**record["data"])
    vocab = Vocab.load(run_dir / "vocab.json")
    model = TransformerClassifier(ClassifierConfig.from_dict(record["model"]))
    checkpoints = run_dir / "checkpoints"
    best = checkpoints / "best" if (checkpoints / "best").exists() else checkpoints / "last"
    load_model_weights(model, best)
    model.to(device or "cpu").eval()
    collate = ClassificationCollator(max_length=data.max_length, pad_id=vocab["<pad>"], truncation=data.truncation)
    return ClassifierRun(model, vocab, data, collate)


runs.register(TASK, load_run)
