"""The IMDB movie-review dataset (Maas et al. 2011), from local files or the Hugging Face hub.

Maas et al. 2011, "Learning Word Vectors for Sentiment Analysis", ACL:
https://ai.stanford.edu/~amaas/data/sentiment/. 25,000 train and 25,000 test reviews (half
negative, label 0; half positive, label 1; train and test are of disjoint movies) and 50,000
unlabelled reviews (label -1), in the row order of Hugging Face `stanfordnlp/imdb`: negatives
then positives, each sorted by review id.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SPLITS = ("train", "test", "unsupervised")
HUB_NAME = "stanfordnlp/imdb"
DATA_DIR_ENV = "TUNELAB_DATA_DIR"
_COLUMNS = ("text", "label")
_REVIEW_FILE = re.compile(r"(\d+)_(\d+)\.txt")  # <review id>_<star rating>.txt


def load_imdb(
    split: str, data_dir: str | Path | None = None, limit: int | None = None, seed: int = 0
) -> datasets.Dataset:
    """Load one IMDB split as a `datasets.Dataset` with columns `text` (str) and `label` (int).

    Looks in `data_dir`, else in `$TUNELAB_DATA_DIR`, else downloads `stanfordnlp/imdb`. A local
    folder holds `{split}.parquet` or the extracted `aclImdb/` tree (or is that tree itself).

    Args:
        split: "train", "test" or "unsupervised".
        data_dir: folder with the data; None falls back to the environment, then the hub.
        limit: keep only this many reviews, a class-balanced random subset in shuffled order
            (the full split keeps the file order, sorted by label). Larger limits of one seed
            contain the smaller ones.
        seed: chooses the subset and its order.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown IMDB split {split!r}; expected one of {SPLITS}")
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or None
    if data_dir is None:
        dataset = datasets.load_dataset(HUB_NAME, split=split)
        if limit is not None:
            dataset = dataset.select(_balanced_subset(dataset["label"][:], limit, seed))
        return dataset

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"IMDB data directory {data_dir} does not exist or is not a folder")
    parquet = data_dir / f"{split}.parquet"
    if parquet.is_file():
        table = _read_parquet(parquet)
        if limit is not None:
            table = table.take(_balanced_subset(table.column("label").to_pylist(), limit, seed))
    else:
        files, labels = _list_review_files(data_dir, split)
        if limit is not None:
            chosen = _balanced_subset(labels, limit, seed)
            files, labels = [files[i] for i in chosen], [labels[i] for i in chosen]
        texts = [path.read_text(encoding="utf-8") for path in files]  # "<br />" kept, as on the hub
        table = pa.table(
            {"text": pa.array(texts, pa.string()), "label": pa.array(labels, pa.int64())}
        )
    return datasets.Dataset(table, split=datasets.NamedSplit(split))


def _read_parquet(path: Path) -> pa.Table:
    """Read the `text` and `label` columns of a parquet file, checking they are there."""
    columns = pq.read_schema(path).names
    if not set(_COLUMNS) <= set(columns):
        raise ValueError(f"{path} has columns {columns}; expected {list(_COLUMNS)}")
    table = pq.read_table(path, columns=list(_COLUMNS))
    return table.cast(pa.schema([("text", pa.string()), ("label", pa.int64())]))


def _list_review_files(data_dir: Path, split: str) -> tuple[list[Path], list[int]]:
    """The review files of `split` in an aclImdb tree: neg (0) then pos (1), each by numeric id."""
    if split == "unsupervised":
        folders = [("train/unsup", -1)]
    else:
        folders = [(f"{split}/neg", 0), (f"{split}/pos", 1)]
    for root in (data_dir / "aclImdb", data_dir):
        if all((root / sub).is_dir() for sub, _ in folders):
            break
    else:
        expected = " and ".join(f"aclImdb/{sub}/" for sub, _ in folders)
        raise FileNotFoundError(
            f"{data_dir} holds neither {split}.parquet nor an extracted IMDB tree ({expected})"
        )

    files, labels = [], []
    for sub, label in folders:
        # Numeric order: "10_2.txt" comes after "9_1.txt", unlike in a string sort.
        found = sorted(
            (int(match.group(1)), path)
            for path in (root / sub).iterdir()
            if (match := _REVIEW_FILE.fullmatch(path.name))
        )
        if not found:
            raise FileNotFoundError(f"{root / sub} holds no review files named <id>_<rating>.txt")
        files += [path for _, path in found]
        labels += [label] * len(found)
    return files, labels


def _balanced_subset(labels: Sequence[int], limit: int, seed: int) -> list[int]:
    """Row indices of `limit` examples, an equal share per label (the lowest labels get the rest).

    Each class is permuted with the same random stream whatever `limit` is, and its first
    examples are taken, so a larger limit contains a smaller one; the result is then shuffled.
    """
    if limit < 1:
        raise ValueError(f"limit must be a positive number of examples, got {limit}")
    labels = np.asarray(labels)
    classes = np.unique(labels)  # sorted, so label 0 gets the remainder of an odd limit
    share, remainder = divmod(limit, len(classes))
    rng = np.random.default_rng(seed)
    chosen = []
    for k, label in enumerate(classes):
        rows = rng.permutation(np.flatnonzero(labels == label))
        wanted = share + (k < remainder)
        if wanted > len(rows):
            raise ValueError(
                f"limit={limit} asks for {wanted} examples of label {label}, only {len(rows)} exist"
            )
        chosen.append(rows[:wanted])
    return rng.permutation(np.concatenate(chosen)).tolist()


def train_validation_split(
    dataset: datasets.Dataset, validation_size: float | int = 0.1, seed: int = 0
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Hold out a validation set from the training data, stratified by label.

    Model and hyper-parameter choices are made on this validation set; the test split is
    touched once, at the end, so it is refused here (carving validation from test would leak).

    Args:
        dataset: a training set with a `label` column.
        validation_size: a fraction in (0, 1) or a number of examples.
        seed: chooses which examples are held out.

    Returns:
        (train, validation), each keeping the row order of `dataset`.
    """
    if dataset.split is not None and str(dataset.split) == "test":
        raise ValueError("validation must be carved from the train split, never from test")
    n = len(dataset)
    if isinstance(validation_size, float):
        if not 0 < validation_size < 1:
            raise ValueError(f"validation_size={validation_size} must lie in (0, 1) as a fraction")
        n_validation = round(validation_size * n)
    else:
        n_validation = int(validation_size)
    if not 1 <= n_validation < n:
        raise ValueError(f"validation_size={validation_size} gives {n_validation} of {n} examples")

    labels = np.asarray(dataset["label"][:])  # [:] reads a datasets Column at once
    classes, counts = np.unique(labels, return_counts=True)
    # Share n_validation out in proportion to class sizes; largest remainders get the leftovers.
    quotas = counts * n_validation / n
    per_class = np.floor(quotas).astype(int)
    leftovers = np.argsort(-(quotas - per_class), kind="stable")[: n_validation - per_class.sum()]
    per_class[leftovers] += 1

    rng = np.random.default_rng(seed)
    validation = np.concatenate([
        rng.choice(np.flatnonzero(labels == label), size=k, replace=False)
        for label, k in zip(classes, per_class)
    ])
    is_validation = np.zeros(n, dtype=bool)
    is_validation[validation] = True
    train_rows, validation_rows = np.flatnonzero(~is_validation), np.flatnonzero(is_validation)
    return dataset.select(train_rows), dataset.select(validation_rows)
