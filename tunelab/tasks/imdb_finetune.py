"""Fine-tune a pretrained BERT-family encoder (MiniLM, or any local BERT folder) on IMDB, end to end.

load the model and its tokenizer -> carve a validation split from train -> tokenize once with the
model's own WordPiece tokenizer -> [CLS] head+tail-truncated review [SEP] -> apply the method (all weights,
LoRA, adapters, soft prompts ...: tunelab.tasks.methods) -> train with length-bucketed batches -> pick the
best evaluation on validation -> test accuracy. The run folder:

    RUN_DIR/config.json, model.safetensors   full fine-tuning (or a merged LoRA): the best weights, which
                                      transformers' AutoModelForSequenceClassification.from_pretrained(RUN_DIR) loads
    RUN_DIR/adapter/                  PEFT methods: only what was trained (peft's layout where peft has the method)
    RUN_DIR/tokenizer.json, run.json  {"task": "imdb-finetune", data, model, method, method_options, train settings}
    RUN_DIR/metrics.jsonl, curves.png, checkpoints/{best,last}/, results.json
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tunelab.core.collate import ClassificationCollator, LengthBucketSampler, truncate
from tunelab.core.data import load_imdb, train_validation_split
from tunelab.core.hub import WordPieceTokenizer, load_pretrained, save_pretrained
from tunelab.core.train import TrainConfig, train_model
from tunelab.peft.selective import count_parameters
from tunelab.tasks import runs
from tunelab.tasks.methods import adapter_bytes, apply_method, get_method, merge_method, rebuild_method, save_method
from tunelab.tasks.runs import known_settings

TASK = "imdb-finetune"
# The setting of `tunelab finetune imdb` and benchmarks/imdb_finetune.py: BERT's fine-tuning recipe
# (Devlin et al. 2019, appendix A.3: batch 16-32, lr 2e-5..5e-5, 2-4 epochs, linear decay after warm-up).
DEFAULT_TRAIN = dict(epochs=2, batch_size=16, lr=5e-5, weight_decay=0.01, warmup=0.06, schedule="linear",
                     eval_batch_size=64, save_every_steps=100)


@dataclass
class FinetuneData:
    """Which reviews, and how they become model inputs.

    Args:
        data_dir: IMDB folder; None: `$TUNELAB_DATA_DIR`, then the hub.
        limit / test_limit: class-balanced subsets of train (before the validation split) and test.
        validation_size: fraction (or count) of train held out for model selection.
        max_length: tokens per review, [CLS] and [SEP] included (BERT's position table allows 512).
        truncation: "head", "tail" or "head+tail" (Sun et al. 2019: head+tail is best on IMDB).
        seed: chooses the subsets and the split.
        pad_to_multiple_of: each batch's length is rounded up to a multiple of this. Padding is masked, so
            the logits are the same; the CPU's kernel cache holds 16x fewer shapes (see ClassificationCollator).
    """

    data_dir: str | None = None
    limit: int | None = None
    test_limit: int | None = None
    validation_size: float = 0.1
    max_length: int = 256
    truncation: str = "head+tail"
    seed: int = 0
    pad_to_multiple_of: int = 16


@dataclass
class FinetuneRunConfig:
    """A fine-tuning job: the pretrained model, the method and its options, the data, BertConfig overrides,
    training. `merge` folds a LoRA/DoRA/QLoRA update into the weights and saves a full model folder."""

    model: str = "minilm"
    method: str = "full"
    method_options: dict = field(default_factory=dict)  # e.g. {"r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]}
    merge: bool = False
    data: FinetuneData = field(default_factory=FinetuneData)
    model_overrides: dict = field(default_factory=dict)  # e.g. {"hidden_dropout_prob": 0.2}
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**DEFAULT_TRAIN))

    def __post_init__(self):
        method = get_method(self.method)  # an unknown method fails here, before any work
        method.make_config(self.method_options)  # ... and so do unknown or bad options
        if self.merge and not method.mergeable:
            raise ValueError(f"merge folds a low-rank update into the weights; method {self.method!r} has none")

    @property
    def saves_whole_model(self) -> bool:
        """Full fine-tuning and merged runs save a Hugging Face model folder; the other methods an adapter."""
        return self.merge or get_method(self.method).save is None

    def to_dict(self) -> dict:
        return {"task": TASK, "model": str(self.model), "method": self.method,
                "method_options": dict(self.method_options), "merge": self.merge, "data": asdict(self.data),
                "model_overrides": dict(self.model_overrides), "train": self.train.to_dict()}

    @classmethod
    def from_dict(cls, values: dict) -> "FinetuneRunConfig":
        """Build from a dict like `to_dict`'s, over the defaults; unknown keys raise naming them."""
        values = known_settings(cls, {k: v for k, v in values.items() if k != "task"}, "fine-tuning")
        data = known_settings(FinetuneData, values.get("data", {}), "data")
        train = known_settings(TrainConfig, values.get("train", {}), "train")
        return cls(model=values.get("model", "minilm"), method=values.get("method", "full"),
                   method_options=dict(values.get("method_options", {})), merge=bool(values.get("merge", False)),
                   data=FinetuneData(**data), model_overrides=dict(values.get("model_overrides", {})),
                   train=TrainConfig(**{**DEFAULT_TRAIN, "lr": get_method(values.get("method", "full")).lr,
                                        **train}))


def encode_reviews(tokenizer: WordPieceTokenizer, texts, max_length: int, truncation: str) -> list[list[int]]:
    """WordPiece ids of each review without [CLS]/[SEP], already cut to the max_length - 2 the collator keeps."""
    if max_length < 3:
        raise ValueError(f"max_length={max_length} leaves no room for text beside [CLS] and [SEP]")
    return [truncate(ids, max_length - 2, truncation) or [tokenizer.unk_id]
            for ids in tokenizer.encode_batch(texts, add_special_tokens=False)]


def make_collator(tokenizer: WordPieceTokenizer, data: FinetuneData) -> ClassificationCollator:
    return ClassificationCollator(max_length=data.max_length, pad_id=tokenizer.pad_id, truncation=data.truncation,
                                  bos_id=tokenizer.cls_id, eos_id=tokenizer.sep_id,
                                  pad_to_multiple_of=data.pad_to_multiple_of)


def labelled(tokenizer, dataset, data: FinetuneData) -> list[dict]:
    ids = encode_reviews(tokenizer, dataset["text"], data.max_length, data.truncation)
    return [{"input_ids": x, "label": int(y)} for x, y in zip(ids, dataset["label"])]


def run_imdb_finetune(config: FinetuneRunConfig, out_dir: str | Path) -> dict:
    """Fine-tune `config.model` on IMDB, evaluate on the test split, save a run + Hugging Face folder.

    Returns the results dict also written to `out_dir/results.json`.
    """
    out_dir, data, start = Path(out_dir), config.data, time.time()
    torch.manual_seed(config.train.seed)  # the new head's initial weights are part of what the seed fixes
    model, tokenizer = load_pretrained(config.model, task="classification", num_labels=2, **config.model_overrides)
    if tokenizer is None:
        raise FileNotFoundError(f"{config.model} has no tokenizer.json: fine-tuning needs the model's own tokenizer")
    if data.max_length > model.config.max_position_embeddings:
        raise ValueError(f"max_length {data.max_length} exceeds the model's "
                         f"max_position_embeddings {model.config.max_position_embeddings}")
    full_train = load_imdb("train", data.data_dir, limit=data.limit, seed=data.seed)
    train_set, val_set = train_validation_split(full_train, data.validation_size, seed=data.seed)
    train_examples, val_examples = labelled(tokenizer, train_set, data), labelled(tokenizer, val_set, data)
    collate = make_collator(tokenizer, data)
    sampler = LengthBucketSampler([len(e["input_ids"]) for e in train_examples], config.train.batch_size,
                                  seed=config.train.seed)

    runs.write_record(out_dir, config.to_dict())
    train_config = TrainConfig(**{**asdict(config.train), "out_dir": out_dir})
    trained = apply_method(model, config.method, config.method_options, tokenizer)  # what train_model sees
    counts = count_parameters(trained)
    result = train_model(trained, train_examples, val_examples, collate_fn=collate, config=train_config,
                         batch_sampler=sampler)
    # Wall time of training and validation, earlier invocations of a resumed run included.
    train_seconds = result.history[-1]["time"] if result.history else time.time() - start
    runs.load_best(trained, out_dir)
    saved_bytes = None
    if config.saves_whole_model:
        if config.merge:
            trained = merge_method(trained, config.method)
        save_pretrained(trained, out_dir, tokenizer)  # the best weights, loadable by transformers
    else:
        saved_bytes = adapter_bytes(save_method(trained, config.method, out_dir / "adapter"))
        tokenizer.save(out_dir)
        trained = for_inference(trained, config.method)

    test_examples = labelled(tokenizer, load_imdb("test", data.data_dir, limit=data.test_limit, seed=data.seed), data)
    figures = {"train_examples": len(train_examples), "validation_examples": len(val_examples),
               "parameters": counts.total, "trainable_parameters": counts.trainable,
               "trainable_percent": counts.percent, "adapter_bytes": saved_bytes,
               "train_seconds": round(train_seconds, 1), "total_seconds": round(time.time() - start, 1)}
    return runs.finish_run(trained, out_dir, result, train_config, test_examples, collate, figures)


@dataclass
class FinetuneRun:
    """A saved fine-tuning run loaded back: model (best weights, eval mode), tokenizer, data settings."""

    model: torch.nn.Module
    tokenizer: WordPieceTokenizer
    data: FinetuneData
    collate: ClassificationCollator

    def encode(self, texts) -> list[dict]:
        return [{"input_ids": x} for x in encode_reviews(self.tokenizer, texts, self.data.max_length,
                                                         self.data.truncation)]


def for_inference(model: torch.nn.Module, method: str) -> torch.nn.Module:
    """A trained model as it is scored and served: a low-rank update (LoRA, DoRA) folded into its weights, so
    that inference costs what the pretrained model's does (MiniLM with LoRA r=5 on all six linear layers of each
    block: a forward at batch 32 x 256 took 0.77x the unmerged time); equal to the unmerged output up to float
    rounding."""
    return merge_method(model, method) if get_method(method).mergeable else model


def load_run(run_dir: str | Path, device: str | None = None, merge: bool = True) -> FinetuneRun:
    """The model a run saved (its Hugging Face folder, or the pretrained model with the run's adapter), with the
    run's tokenizer and data settings. A LoRA or DoRA adapter comes merged into the weights (`for_inference`)
    unless `merge=False`, which keeps its layers, e.g. to look at them or to merge by hand."""
    run_dir = Path(run_dir)
    config = FinetuneRunConfig.from_dict(runs.read_record(run_dir))
    if config.saves_whole_model:
        if not (run_dir / "model.safetensors").is_file():
            raise FileNotFoundError(f"{run_dir} has no model.safetensors: the run did not finish training")
        model, tokenizer = load_pretrained(run_dir, task="classification")
    else:
        if not (run_dir / "adapter").is_dir():
            raise FileNotFoundError(f"{run_dir} has no adapter/ folder: the run did not finish training")
        torch.manual_seed(config.train.seed)  # a head the pretrained folder lacks starts as it did in the run
        base, base_tokenizer = load_pretrained(config.model, task="classification", num_labels=2,
                                               **config.model_overrides)
        model = rebuild_method(base, config.method, config.method_options, run_dir / "adapter", base_tokenizer)
        model = for_inference(model, config.method) if merge else model
        tokenizer = WordPieceTokenizer.from_file(run_dir / "tokenizer.json")
    model.to(device or "cpu").eval()
    return FinetuneRun(model, tokenizer, config.data, make_collator(tokenizer, config.data))


runs.register(TASK, load_run)
