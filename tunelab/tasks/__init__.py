"""End-to-end jobs, and what they share.

    runs                  the run registry: run.json, and load / evaluate / predict for every kind of run
    methods               the fine-tuning methods of `tunelab finetune`, one record each
    imdb_classification   the from-scratch transformer classifier on IMDB
    imdb_finetune         a pretrained encoder fine-tuned on IMDB by any method
    imdb_mlm              a small BERT pretrained by masked language modelling on IMDB text
    imdb_lm               a small Llama pretrained as a causal language model on IMDB text
    compression           a trained classifier quantized, pruned or clustered into a new run (tunelab.quant)

Importing the package registers every job's kind of run with `runs`, so that `runs.load_run` reads them all.
"""

from tunelab.tasks import compression, imdb_classification, imdb_finetune, imdb_lm, imdb_mlm  # noqa: F401  (they register)
