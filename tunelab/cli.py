"""The `tunelab` command: train, evaluate and use IMDB classifiers.

    tunelab train imdb [--config FILE] [options]   train the from-scratch classifier, print test accuracy
    tunelab finetune imdb --model minilm --method full   fine-tune a pretrained encoder (or --model PATH)
    tunelab finetune imdb --method lora --r 8 --merge    ... or parameter-efficiently (lora, qlora, ia3, prompt, ...)
    tunelab pretrain-mlm imdb [options]             pretrain a small BERT with masked language modelling
    tunelab pretrain-lm imdb [options]              pretrain a small Llama as a causal language model
    tunelab generate MODEL_OR_RUN "a prompt"        continue a prompt with a GPT-2 / Llama
    tunelab compress RUN_DIR --method nf4 --out DIR  quantize, prune or cluster a saved run into a new run
    tunelab evaluate RUN_DIR                        accuracy of a saved run on the test split
    tunelab predict RUN_DIR "a review" ...          sentiment of some texts

Bad arguments and bad input end with one line on stderr and exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tunelab.core.checkpoint import CheckpointError
from tunelab.tasks.compression import COMPRESSIONS
from tunelab.tasks.methods import METHODS

# Options that several commands share, declared once: option -> (section of the run config, key, type, help).
SHARED_OPTIONS = {
    "--data-dir": ("data", "data_dir", str, "IMDB folder (default: $TUNELAB_DATA_DIR, then the hub)"),
    "--limit": ("data", "limit", int, "use this many training reviews (class-balanced where labelled)"),
    "--test-limit": ("data", "test_limit", int, "evaluate on a class-balanced subset of the test split"),
    "--max-length": ("data", "max_length", int, "tokens kept per review"),
    "--truncation": ("data", "truncation", str, "head, tail or head+tail (default head+tail)"),
    "--vocab-size": ("data", "vocab_size", int, "vocabulary size, specials included"),
    "--layers": ("model", "n_layers", int, "number of encoder layers"),
    "--epochs": ("train", "epochs", int, "passes over the training set"),
    "--batch-size": ("train", "batch_size", int, "examples per optimizer step"),
    "--lr": ("train", "lr", float, "peak learning rate"),
    "--weight-decay": ("train", "weight_decay", float, "AdamW weight decay"),
    "--max-steps": ("train", "max_steps", int, "stop after this many steps (resume later with --resume)"),
    "--seed": ("train", "seed", int, "random seed"),
    "--device": ("train", "device", str, "cpu, cuda or auto (default cpu)"),
}


def command_options(shared: dict[str, str | None], own: dict | None = None) -> dict:
    """The shared options a command takes, each with the command's default (or key) appended, then its own.

    `shared` maps a shared option to a note for its help ("default 512"), None for none, or {"key": ...} where
    the command stores the option under another key of its section (pretrain-mlm's --layers)."""
    table = {}
    for option, note in shared.items():
        section, key, kind, text = SHARED_OPTIONS[option]
        if isinstance(note, dict):
            key, note = note["key"], note.get("note")
        table[option] = (section, key, kind, f"{text} ({note})" if note else text)
    return {**table, **(own or {})}


TRAIN_OPTIONS = command_options(
    {"--data-dir": None, "--limit": None, "--test-limit": None, "--max-length": "default 512", "--truncation": None,
     "--vocab-size": "default 30000", "--layers": None, "--epochs": None, "--batch-size": None, "--lr": None,
     "--weight-decay": None, "--seed": None, "--device": None},
    {"--min-freq": ("data", "min_freq", int, "least count of a token to enter the vocabulary"),
     "--d-model": ("model", "d_model", int, "width of the transformer"),
     "--heads": ("model", "n_heads", int, "attention heads per layer"),
     "--d-ff": ("model", "d_ff", int, "hidden width of the feed-forward block"),
     "--dropout": ("model", "dropout", float, "dropout probability"),
     "--pooling": ("model", "pooling", str, "mean, max or cls"),
     "--bigram-buckets": ("model", "bigram_buckets", int, "rows of the hashed bigram table (0: none)"),
     "--token-dropout": ("model", "token_dropout", float, "probability of hiding each token while training"),
     "--schedule": ("train", "schedule", str, "linear, cosine or constant (after warm-up)"),
     "--patience": ("train", "early_stopping_patience", int, "stop after this many evaluations without gain")})

FINETUNE_OPTIONS = command_options(
    {"--data-dir": None, "--limit": None, "--test-limit": None, "--max-length": "[CLS]/[SEP] included, default 256",
     "--truncation": None, "--epochs": "default 2", "--batch-size": "default 16",
     "--lr": "default: the method's, 5e-5 for full", "--weight-decay": None, "--max-steps": None, "--seed": None,
     "--device": None},
    {"--eval-every": ("train", "eval_every_steps", int, "also evaluate on validation every this many steps")})

MLM_OPTIONS = command_options(
    {"--data-dir": None, "--limit": "default: all 75,000 unsupervised + train", "--max-length":
     "pieces per chunk, [CLS]/[SEP] included, default 128", "--vocab-size": "WordPiece, default 16000",
     "--layers": {"key": "num_hidden_layers", "note": "default 4"}, "--epochs": "default 1",
     "--batch-size": "default 64", "--lr": "default 5e-4", "--max-steps": None, "--seed": None, "--device": None},
    {"--hidden-size": ("model", "hidden_size", int, "width of the encoder (default 256)"),
     "--heads": ("model", "num_attention_heads", int, "attention heads (default 4)"),
     "--intermediate-size": ("model", "intermediate_size", int, "feed-forward width (default 1024)")})


LM_OPTIONS = command_options(
    {"--data-dir": None, "--limit": "default: all 75,000 unsupervised + train", "--vocab-size": "BPE, default 8192",
     "--layers": {"key": "num_hidden_layers", "note": "default 6"}, "--epochs": "default 1",
     "--batch-size": "default 32", "--lr": "default 1e-3", "--max-steps": None, "--seed": None, "--device": None},
    {"--block-size": ("data", "block_size", int, "tokens per packed training sequence (default 256)"),
     "--hidden-size": ("model", "hidden_size", int, "width of the decoder (default 384)"),
     "--heads": ("model", "num_attention_heads", int, "query heads (default 6)"),
     "--kv-heads": ("model", "num_key_value_heads", int, "key/value heads, grouped-query attention (default 2)"),
     "--intermediate-size": ("model", "intermediate_size", int, "SwiGLU width (default 1024)"),
     "--eval-every": ("train", "eval_every_steps", int, "evaluate and write samples every this many steps"),
     "--precision": ("train", "mixed_precision", str, "auto, bf16 (autocast, fast on CPUs with AMX) or no")})


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


# option -> (section, key, type, help) of the method options of `tunelab finetune`; the key is a field of the
# method's config (tunelab.tasks.methods), and the help names the methods that take it.
METHOD_OPTIONS = {
    "--r": ("method_options", "r", int, "rank of the update (default 8)"),
    "--alpha": ("method_options", "alpha", float, "the update is scaled by alpha/r (default 16)"),
    "--lora-dropout": ("method_options", "dropout", float, "dropout on the adapter input (default 0)"),
    "--targets": ("method_options", "targets", _names, "comma-separated module-name suffixes "
                  "or all-linear (default q_proj,v_proj for lora, all-linear for qlora)"),
    "--rslora": ("method_options", "use_rslora", bool, "scale by alpha/sqrt(r) (rank-stabilised)"),
    "--reduction-factor": ("method_options", "reduction_factor", int, "width/bottleneck (default 16)"),
    "--virtual-tokens": ("method_options", "num_virtual_tokens", int, "learned positions (default 20)"),
    "--prompt-init": ("method_options", "init", str, "random, vocab or text"),
    "--prompt-init-text": ("method_options", "init_text", str, "the text whose embeddings start the prompt"),
    "--prefix-projection": ("method_options", "projection", bool, "learn the prefixes through an MLP"),
    "--quant-type": ("method_options", "quant_type", str, "nf4 or fp4: the 4-bit codes of the frozen base"),
    "--compute-dtype": ("method_options", "compute_dtype", str, "float32 or bfloat16: the base's matmul"),
    "--quantize-frozen": ("method_options", "quantize_frozen", bool, "store the unadapted linear layers in 4 bits"),
    "--quantize-embeddings": ("method_options", "quantize_embeddings", bool, "store the token embeddings in 4 bits"),
    "--train-layers": ("method_options", "layers", int, "how many top encoder layers train (default 2)"),
}


# option -> (key, type, help) of the options of `tunelab compress`; each method takes some (COMPRESSIONS).
COMPRESS_OPTIONS = {
    "--group-size": ("group_size", int, "weights per int4 scale (default 64)"),
    "--blocksize": ("blocksize", int, "weights per 4-bit absmax block (default 64)"),
    "--threshold": ("threshold", float, "activation outlier threshold (default 6.0)"),
    "--bits": ("bits", int, "bits per codebook index (default 4)"),
    "--amount": ("amount", float, "fraction of weights (or heads and neurons) removed"),
    "--scope": ("scope", str, "layer or global: where the smallest weights are ranked (default layer)"),
    "--norm": ("norm", int, "1 or 2: the norm that ranks heads and neurons (default 2)"),
    "--clusters": ("clusters", int, "codebook entries per layer (default 16)"),
    "--init": ("init", str, "kmeans++, linear, random or density (default kmeans++)"),
}


def methods_taking(key: str) -> list[str]:
    """The fine-tuning methods whose config has the option `key`."""
    return [name for name, method in METHODS.items() if key in method.options()]


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line instead of usage + error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def add_run_command(commands, name: str, options: dict, out: str, sections: str, task_help: str, **parser_kwargs):
    """A sub-command that trains a run: the task, --config, --out, --resume, --quiet, then its `options`."""
    command = commands.add_parser(name, **parser_kwargs)
    command.add_argument("task", choices=["imdb"], help=task_help)
    command.add_argument("--config", type=Path, help=f"YAML or JSON file with {sections} sections")
    command.add_argument("--out", type=Path, default=Path(out), help=f"run folder (default {out})")
    command.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    command.add_argument("--quiet", action="store_true", help="no progress bars")
    for option, (_, _, kind, text) in options.items():
        if kind is bool:
            command.add_argument(option, action="store_const", const=True, help=text)
        else:
            command.add_argument(option, type=kind, help=text)
    return command


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tunelab", description="Fine-tuning, taught by building every piece by hand.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    reviews = "the task (imdb: sentiment of movie reviews)"

    add_run_command(commands, "train", TRAIN_OPTIONS, "runs/imdb", "data/model/train", reviews,
                    help="train a model on a task",
                    description="Train the from-scratch transformer classifier and print test accuracy.")

    methods = "\n".join(f"  {name:17s} {method.summary}" for name, method in METHODS.items())
    method_options = {option: (section, key, kind, f"{'/'.join(methods_taking(key))}: {text}")
                      for option, (section, key, kind, text) in METHOD_OPTIONS.items()}
    finetune = add_run_command(commands, "finetune", {**FINETUNE_OPTIONS, **method_options}, "runs/finetune",
                               "data/train", reviews, help="fine-tune a pretrained encoder on a task",
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               description="Fine-tune a pretrained BERT-family encoder and print test accuracy.",
                               epilog=f"methods (--method):\n{methods}")
    finetune.add_argument("--model", default="minilm", help="minilm, a local Hugging Face BERT folder, or a hub id")
    finetune.add_argument("--method", default="full",
                          help=f"how to fine-tune: {', '.join(METHODS)} (default full: every weight; see below)")
    finetune.add_argument("--merge", action="store_true",
                          help="lora/dora: fold the update into the weights and save a full model folder")

    add_run_command(commands, "pretrain-mlm", MLM_OPTIONS, "runs/mlm", "data/model/train",
                    "the corpus (imdb: unsupervised + train reviews)",
                    help="pretrain a small BERT with masked language modelling",
                    description="Pretrain a BERT from scratch on IMDB text (never the test split) by masked language "
                                "modelling; the run folder is a Hugging Face model that `tunelab finetune imdb "
                                "--model RUN_DIR` fine-tunes.")

    add_run_command(commands, "pretrain-lm", LM_OPTIONS, "runs/lm", "data/model/train",
                    "the corpus (imdb: unsupervised + train reviews)",
                    help="pretrain a small Llama as a causal language model",
                    description="Pretrain a Llama from scratch on IMDB text (never the test split) by next-token "
                                "prediction on packed reviews; the run folder is a Hugging Face model that "
                                "`tunelab generate RUN_DIR \"prompt\"` continues.")

    compressions = "\n".join(f"  {name:17s} {c.summary}" for name, c in COMPRESSIONS.items())
    compress = commands.add_parser("compress", help="quantize, prune or cluster a saved run into a new run",
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   description="Compress the model of a classifier run; the new run folder is read by "
                                               "`tunelab evaluate` and `tunelab predict`.",
                                   epilog=f"methods (--method):\n{compressions}")
    compress.add_argument("run_dir", type=Path, help="folder written by `tunelab train` or `tunelab finetune`")
    compress.add_argument("--method", required=True, choices=list(COMPRESSIONS), metavar="METHOD",
                          help="how to compress (see below)")
    compress.add_argument("--out", type=Path, required=True, help="the new run folder (must not exist)")
    compress.add_argument("--skip", type=_names, default=[],
                          help="comma-separated module names kept in floating point (e.g. classifier)")
    compress.add_argument("--no-embeddings", action="store_true", help="keep the embedding tables in floating point")
    for option, (key, kind, text) in COMPRESS_OPTIONS.items():
        takers = "/".join(name for name, c in COMPRESSIONS.items() if key in c.options)
        compress.add_argument(option, type=kind, help=f"{takers}: {text}")

    evaluate = commands.add_parser("evaluate", help="evaluate a saved run",
                                   description="Accuracy of a saved run on an IMDB split.")
    evaluate.add_argument("run_dir", type=Path, help="folder written by `tunelab train` or `tunelab finetune`")
    evaluate.add_argument("--split", choices=["test", "train"], default="test")
    evaluate.add_argument("--limit", type=int, help="class-balanced subset of the split")
    evaluate.add_argument("--data-dir", help="IMDB folder (default: the run's, then $TUNELAB_DATA_DIR)")

    predict = commands.add_parser("predict", help="classify texts with a saved run",
                                  description="Print the predicted sentiment of each text.")
    predict.add_argument("run_dir", type=Path, help="folder written by `tunelab train` or `tunelab finetune`")
    predict.add_argument("texts", nargs="+", help="review texts")

    generate = commands.add_parser("generate", help="continue a prompt with a causal LM",
                                   description="Generate text with a GPT-2 or Llama folder (a Hugging Face folder "
                                               "or a TuneLab run folder); one prompt streams as it is written.")
    generate.add_argument("model", help="a GPT-2 / Llama model folder (config.json, model.safetensors, tokenizer.json)")
    generate.add_argument("prompts", nargs="+", help="the prompts")
    generate.add_argument("--max-new-tokens", type=int, default=60)
    generate.add_argument("--greedy", action="store_true", help="always the most likely token (default: sample)")
    generate.add_argument("--temperature", type=float, default=0.8)
    generate.add_argument("--top-k", type=int, default=50)
    generate.add_argument("--top-p", type=float, default=0.95)
    generate.add_argument("--repetition-penalty", type=float, default=1.1)
    generate.add_argument("--seed", type=int, default=0, help="the random seed of sampling")
    return parser


def load_config_file(path: Path) -> dict:
    """Read a YAML (.yaml/.yml) or JSON run config; errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping with data/model/train sections")
    return values


def run_settings(args, options: dict, sections: tuple[str, ...]) -> dict:
    """The settings of a run: the config file, under --resume the run's own saved ones, then the options."""
    values = load_config_file(args.config) if args.config else {}
    saved = Path(args.out) / "run.json"
    if args.resume and saved.is_file():  # continue with the run's own settings; options still override
        record = json.loads(saved.read_text())
        record["train"].pop("max_steps", None)  # where the first invocation was told to stop, not the run's length
        values = {**{k: v for k, v in record.items() if k not in sections}, **values,
                  **{section: {**record.get(section, {}), **values.get(section, {})} for section in sections}}
    for option, (section, key, _, _) in options.items():
        value = getattr(args, option[2:].replace("-", "_"))
        if value is not None:
            values.setdefault(section, {})[key] = value
    values.setdefault("train", {})
    values["train"].update(resume=args.resume, progress=not args.quiet, out_dir=str(args.out))
    return values


def _train(args) -> None:
    from tunelab.tasks.imdb_classification import ImdbRunConfig, run_imdb_classification

    config = ImdbRunConfig.from_dict(run_settings(args, TRAIN_OPTIONS, ("data", "model", "train")))
    results = run_imdb_classification(config, args.out)
    print(f"test accuracy: {results['test_accuracy']:.2%} on {results['test_examples']} reviews "
          f"({results['parameters']:,} parameters, {results['train_seconds']:.0f} s); run saved in {args.out}")


def _finetune(args) -> None:
    from tunelab.tasks.imdb_finetune import FinetuneRunConfig, run_imdb_finetune

    values = run_settings(args, {**FINETUNE_OPTIONS, **METHOD_OPTIONS}, ("data", "train", "method_options"))
    if not args.resume or "model" not in values:
        values.update(model=args.model, method=args.method, merge=args.merge)
    config = FinetuneRunConfig.from_dict(values)
    results = run_imdb_finetune(config, args.out)
    print(f"test accuracy: {results['test_accuracy']:.2%} on {results['test_examples']} reviews "
          f"({results['trainable_parameters']:,} of {results['parameters']:,} parameters trained "
          f"= {results['trainable_percent']:.2f}%, {results['train_seconds']:.0f} s); "
          + (f"adapter saved in {args.out / 'adapter'}" if results["adapter_bytes"] is not None
             else f"run and Hugging Face model saved in {args.out}"))


def _pretrain_mlm(args) -> None:
    from tunelab.tasks.imdb_mlm import MlmRunConfig, run_imdb_mlm

    values = run_settings(args, MLM_OPTIONS, ("data", "model", "train"))
    if args.resume:  # the saved model section holds the built config (vocab size etc.): keep the choices only
        values["model"] = {k: values["model"][k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                           "intermediate_size") if k in values.get("model", {})}
    results = run_imdb_mlm(MlmRunConfig.from_dict(values), args.out)
    print(f"masked-token accuracy {results['val_mlm_accuracy']:.2%}, loss {results['val_mlm_loss']:.3f} on "
          f"{results['val_masked_tokens']:,} held-out masked pieces ({results['parameters']:,} parameters, "
          f"{results['train_seconds']:.0f} s); Hugging Face model saved in {args.out}")


def _pretrain_lm(args) -> None:
    from tunelab.tasks.imdb_lm import LmRunConfig, run_imdb_lm

    values = run_settings(args, LM_OPTIONS, ("data", "model", "train"))
    if args.resume:  # the saved model section holds the built config (vocab size etc.): keep the choices only
        values["model"] = {k: values["model"][k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                           "num_key_value_heads", "intermediate_size")
                           if k in values.get("model", {})}
    results = run_imdb_lm(LmRunConfig.from_dict(values), args.out)
    print(f"validation perplexity {results['val_perplexity']:.2f} (loss {results['val_loss']:.3f}) on "
          f"{results['val_tokens']:,} held-out tokens ({results['parameters']:,} parameters, "
          f"{results['train_tokens_seen']:,} tokens seen, {results['train_seconds']:.0f} s); "
          f"Hugging Face model saved in {args.out}")
    for sample in results["samples"]:
        print(f"  {sample!r}")


def _compress(args) -> None:
    from tunelab.tasks.compression import compress_run

    options = {key: getattr(args, option[2:].replace("-", "_")) for option, (key, _, _) in COMPRESS_OPTIONS.items()}
    results = compress_run(args.run_dir, args.method, args.out, {k: v for k, v in options.items() if v is not None},
                           skip=args.skip, embeddings=not args.no_embeddings)
    print(f"{args.method}: {results['bytes']:,} bytes for {results['params']:,} parameters "
          f"({results['bits_per_param']:.2f} bits each, {results['ratio']:.2f}x smaller than float32, "
          f"{results['sparsity']:.1%} zeros); run saved in {args.out} (`tunelab evaluate {args.out}`)")


def _evaluate(args) -> None:
    from tunelab.tasks.runs import evaluate_run

    metrics = evaluate_run(args.run_dir, split=args.split, limit=args.limit, data_dir=args.data_dir)
    print(f"{args.split} accuracy: {metrics['accuracy']:.2%}  loss: {metrics['loss']:.4f}  "
          f"({metrics['n']} reviews)")


def _predict(args) -> None:
    from tunelab.tasks.runs import predict

    for text, result in zip(args.texts, predict(args.run_dir, args.texts)):
        print(f"{result['label']}\t{result['probability']:.3f}\t{text}")


def _generate(args) -> None:
    import torch

    from tunelab.core.decoder import CausalLM
    from tunelab.core.generate import generate_text
    from tunelab.core.hub import load_pretrained

    model, tokenizer = load_pretrained(args.model)
    if not isinstance(model, CausalLM) or tokenizer is None:
        raise ValueError(f"{args.model} is not a causal LM folder with a tokenizer.json")
    options = dict(do_sample=not args.greedy, repetition_penalty=args.repetition_penalty)
    if not args.greedy:
        options.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       generator=torch.Generator().manual_seed(args.seed))
    if len(args.prompts) == 1:
        print(args.prompts[0], end="", flush=True)
        generate_text(model, tokenizer, args.prompts, args.max_new_tokens,
                      on_text=lambda text: print(text, end="", flush=True), **options)
        print()
        return
    for prompt, text in zip(args.prompts, generate_text(model, tokenizer, args.prompts, args.max_new_tokens,
                                                        **options)):
        print(f"{prompt}{text}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"train": _train, "finetune": _finetune, "pretrain-mlm": _pretrain_mlm, "pretrain-lm": _pretrain_lm,
                "compress": _compress,
                "evaluate": _evaluate, "predict": _predict, "generate": _generate}
    try:
        handlers[args.command](args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, CheckpointError, KeyboardInterrupt) as error:
        message = "interrupted" if isinstance(error, KeyboardInterrupt) else str(error).strip().splitlines()[0]
        print(f"tunelab {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
