"""Benchmark: the from-scratch transformer classifier on the full IMDB.

Trains on the 25,000 training reviews minus a 10% validation split (model selection only), then
reports accuracy on all 25,000 test reviews. Target: at least 88.5% with at most 30 minutes of
training on a 2-core CPU. References: the Keras "text classification with transformer"
example, 87.45%; d2l.ai TextCNN, 86.8%.

    python benchmarks/imdb_scratch.py                 # the benchmark setting: kept, RESULTS.md rebuilt
    python benchmarks/imdb_scratch.py --limit 2000    # a quick look (not kept)
    python benchmarks/imdb_scratch.py --bigram-buckets 0   # ablation: no bigram embeddings

The setting is the default of `tunelab train imdb` (DEFAULT_MODEL / DEFAULT_TRAIN in
tunelab/tasks/imdb_classification.py), so `tunelab train imdb` reproduces the row. A finished run is kept
as benchmarks/results/imdb_scratch/seedN[-bigramsB].json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from _common import add_no_save, save_run  # benchmarks/ is on sys.path when a script in it runs

from tunelab.tasks.imdb_classification import ImdbRunConfig, run_imdb_classification


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/imdb_scratch"))
    parser.add_argument("--limit", type=int, help="train subset (a quick look; not kept)")
    parser.add_argument("--test-limit", type=int)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--bigram-buckets", type=int, help="override the default bigram table (0: none, an ablation)")
    parser.add_argument("--seed", type=int, default=0, help="training seed: initial weights, batch order, dropout")
    add_no_save(parser)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    # The benchmark setting is the default of `tunelab train imdb` (tunelab/tasks/imdb_classification.py).
    model = {} if args.bigram_buckets is None else {"bigram_buckets": args.bigram_buckets}
    config = ImdbRunConfig.from_dict({"data": {"limit": args.limit, "test_limit": args.test_limit}, "model": model,
                                     "train": {"seed": args.seed}})
    start = time.time()
    results = run_imdb_classification(config, args.out)
    total = time.time() - start
    print(f"test accuracy {results['test_accuracy']:.2%} ({results['test_examples']} reviews), "
          f"best validation {results['best_validation']:.2%}, {results['parameters']:,} parameters, "
          f"training {results['train_seconds'] / 60:.1f} min, total {total / 60:.1f} min")
    if args.limit is None and args.test_limit is None and not args.no_save:
        m, d = config.model, config.data
        setting = (f"d{m['d_model']} L{m['n_layers']} H{m['n_heads']} ff{m['d_ff']} {m['pooling']}-pool, "
                   f"{m.get('bigram_buckets', 0):,} bigram buckets, token dropout {m.get('token_dropout', 0.0)}, "
                   f"{d.max_length} tok {d.truncation}, vocab {results['vocab_size']}, {config.train.epochs} ep, "
                   f"seed {args.seed}")
        figures = (f"{results['parameters']:,} params, training {results['train_seconds'] / 60:.1f} min, "
                   f"best val {results['best_validation']:.2%}")
        label = f"seed{args.seed}" + ("" if args.bigram_buckets is None else f"-bigrams{args.bigram_buckets}")
        save_run("imdb_scratch", label, {**results, "setting": setting},
                 [{"setting": setting, "headline": f"{results['test_accuracy']:.2%}", "figures": figures}])


if __name__ == "__main__":
    main()
