"""Benchmark: a BERT pretrained from scratch by masked language modelling on IMDB text, then fine-tuned.

Stage 1 (`tunelab pretrain-mlm imdb`): a BERT learns MLM on the 50,000 unsupervised + 25,000 train
reviews (never the test split). Stage 2 (`tunelab finetune imdb --model <stage 1 folder>`): every
weight is fine-tuned on the 22,500 labelled training reviews (10% held out for validation) and
evaluated on all 25,000 test reviews. Target: at least 91.3% test accuracy, beating the NBSVM
bag-of-bigrams baseline (91.22%, Wang & Manning 2012). The row records the compute it took.

    python benchmarks/imdb_mlm.py                                   # the default setting: kept, RESULTS.md rebuilt
    python benchmarks/imdb_mlm.py --device auto --mlm-epochs 10     # on a GPU: more pretraining
    python benchmarks/imdb_mlm.py --limit 2000 --finetune-limit 2000 --test-limit 1000 --no-save  # a look

Both stages resume from their last checkpoint when run again with --resume. A finished run is kept as
benchmarks/results/imdb_mlm/L4-H256-mlm1ep.json (layers, width, MLM epochs).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import add_training_run_options, parse_with_threads, save_run
from tunelab.tasks.imdb_finetune import FinetuneRunConfig, run_imdb_finetune
from tunelab.tasks.imdb_mlm import MlmRunConfig, run_imdb_mlm


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/imdb_mlm"))
    parser.add_argument("--limit", type=int, help="pretraining reviews (default: all 75,000)")
    parser.add_argument("--mlm-epochs", type=int, default=1)
    parser.add_argument("--mlm-length", type=int, default=128, help="pieces per pretraining chunk")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--finetune-limit", type=int, help="labelled training reviews (default: all)")
    parser.add_argument("--test-limit", type=int)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--finetune-lr", type=float, default=1e-4)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per review when fine-tuning")
    add_training_run_options(parser)
    args = parse_with_threads(parser, argv)
    device = {"device": args.device} if args.device else {}
    mlm_dir, clf_dir = args.out / "mlm", args.out / "finetune"
    if not (args.resume and (mlm_dir / "results.json").exists()):
        mlm_config = MlmRunConfig.from_dict({
            "data": {"limit": args.limit, "max_length": args.mlm_length},
            "model": {"hidden_size": args.hidden_size, "num_hidden_layers": args.layers,
                      "num_attention_heads": args.hidden_size // 64, "intermediate_size": 4 * args.hidden_size,
                      "max_position_embeddings": max(512, args.max_length)},
            "train": {"epochs": args.mlm_epochs, "out_dir": str(mlm_dir), "resume": args.resume, **device}})
        run_imdb_mlm(mlm_config, mlm_dir)
    mlm = json.loads((mlm_dir / "results.json").read_text())
    clf_config = FinetuneRunConfig.from_dict({
        "model": str(mlm_dir), "method": "full",
        "data": {"limit": args.finetune_limit, "test_limit": args.test_limit, "max_length": args.max_length},
        "train": {"epochs": args.finetune_epochs, "lr": args.finetune_lr, "out_dir": str(clf_dir),
                  "resume": args.resume, **device}})
    clf = run_imdb_finetune(clf_config, clf_dir)
    hours = (mlm["train_seconds"] + clf["train_seconds"]) / 3600
    print(f"MLM: {mlm['val_mlm_accuracy']:.2%} masked-token accuracy after {mlm['steps']} steps "
          f"({mlm['train_tokens_seen']:,} tokens); fine-tuned: {clf['test_accuracy']:.2%} test accuracy "
          f"({clf['test_examples']} reviews); {hours:.2f} h of training in all")
    full = args.limit is None and args.finetune_limit is None and args.test_limit is None
    if full and not args.no_save:
        setting = (f"L{args.layers} H{args.hidden_size}, MLM {args.mlm_epochs} ep x {mlm['train_chunks']:,} chunks of "
                   f"{args.mlm_length}, then full fine-tuning {args.finetune_epochs} ep at {args.max_length} tok")
        figures = (f"{mlm['parameters']:,} params; MLM val acc {mlm['val_mlm_accuracy']:.2%}, "
                   f"{mlm['train_tokens_seen']:,} tokens seen; compute {hours:.2f} h "
                   f"(MLM {mlm['train_seconds'] / 3600:.2f} h + fine-tuning {clf['train_seconds'] / 3600:.2f} h)")
        save_run("imdb_mlm", f"L{args.layers}-H{args.hidden_size}-mlm{args.mlm_epochs}ep",
                 {"mlm": mlm, "finetune": clf, "setting": setting, "compute_hours": hours},
                 [{"setting": setting, "headline": f"{clf['test_accuracy']:.2%}", "figures": figures}])


if __name__ == "__main__":
    main()
