"""Benchmark: a pretrained encoder (MiniLM) fully fine-tuned on the full IMDB.

Trains on the 25,000 training reviews minus a 10% validation split (model selection only), at most
256 tokens per review (head+tail), at most 2 epochs, then reports accuracy on all 25,000 test reviews.
Target: at least 92.0% (references: DistilBERT 92.8%, BERT-base at 512 tokens 93.3%, Sun et al. 2019).

    python benchmarks/imdb_finetune.py --method full                  # kept, RESULTS.md rebuilt
    python benchmarks/imdb_finetune.py --method full --resume         # continue an interrupted run
    python benchmarks/imdb_finetune.py --limit 500 --test-limit 500   # a quick look (not kept)

The setting is the default of `tunelab finetune imdb --model minilm --method full`. A finished run is kept
as benchmarks/results/imdb_finetune/METHOD.json (imdb_peft.py's summary takes full fine-tuning from there).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from _common import add_no_save, resumable, save_run
from tunelab.tasks.imdb_finetune import FinetuneRunConfig, run_imdb_finetune


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--method", default="full")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/imdb_finetune"))
    parser.add_argument("--limit", type=int, help="train subset (a quick look; not kept)")
    parser.add_argument("--test-limit", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", help="cpu, cuda or auto")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_no_save(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train = {"out_dir": str(args.out), "resume": resumable(args.resume, args.out)}
    for key in ("epochs", "lr", "device"):
        if getattr(args, key) is not None:
            train[key] = getattr(args, key)
    config = FinetuneRunConfig.from_dict({"model": args.model, "method": args.method, "train": train,
                                          "data": {"limit": args.limit, "test_limit": args.test_limit}})
    start = time.time()
    r = run_imdb_finetune(config, args.out)
    print(f"test accuracy {r['test_accuracy']:.2%} ({r['test_examples']} reviews), best validation "
          f"{r['best_validation']:.2%}, {r['trainable_parameters']:,} trained parameters, "
          f"{r['train_seconds'] / 60:.1f} min training, {(time.time() - start) / 60:.1f} min this invocation")
    if args.limit is None and args.test_limit is None and not args.no_save:
        d, t = config.data, config.train
        setting = (f"{args.method}, {args.model}, {d.max_length} tok {d.truncation}, {t.epochs} ep, batch "
                   f"{t.batch_size}, lr {t.lr:g}, seed {t.seed}")
        figures = (f"{r['trainable_parameters']:,} trained params, training {r['train_seconds'] / 60:.1f} min "
                   f"(wall, resumes included), best val {r['best_validation']:.2%}")
        save_run("imdb_finetune", args.method, {**r, "method": args.method, "setting": setting},
                 [{"setting": setting, "headline": f"{r['test_accuracy']:.2%}", "figures": figures}])


if __name__ == "__main__":
    main()
