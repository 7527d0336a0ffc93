"""Tests for tunelab.core.data: load_imdb (parquet, aclImdb tree, env, hub) and the split."""

from collections import Counter

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tunelab.core import data
from tunelab.core.data import load_imdb, train_validation_split


def test_parquet_limit_is_balanced_shuffled_and_seeded(imdb_dir):
    subset = load_imdb("train", data_dir=imdb_dir, limit=101, seed=0)
    assert subset.column_names == ["text", "label"]
    assert len(subset) == 101
    assert Counter(subset["label"][:]) == {0: 51, 1: 50}  # the odd one goes to label 0
    labels = subset["label"][:]
    assert labels != sorted(labels)  # shuffled, not negatives then positives
    assert all(isinstance(text, str) and text for text in subset["text"][:])

    again = load_imdb("train", data_dir=imdb_dir, limit=101, seed=0)
    other = load_imdb("train", data_dir=imdb_dir, limit=101, seed=1)
    assert again["text"][:] == subset["text"][:]
    assert set(other["text"][:]) != set(subset["text"][:])


def test_parquet_larger_limit_contains_smaller(imdb_dir):
    small = load_imdb("test", data_dir=imdb_dir, limit=20, seed=3)
    large = load_imdb("test", data_dir=imdb_dir, limit=60, seed=3)
    assert set(small["text"][:]) < set(large["text"][:])


def test_parquet_full_split_keeps_file_order(imdb_dir):
    full = load_imdb("test", data_dir=imdb_dir)
    labels = full["label"][:]
    assert len(full) == 25_000 and full.split == "test"
    assert labels[:12_500] == [0] * 12_500 and labels[12_500:] == [1] * 12_500


def test_unsupervised_limit_is_a_random_subset(imdb_dir):
    subset = load_imdb("unsupervised", data_dir=imdb_dir, limit=7, seed=0)
    assert len(subset) == 7 and set(subset["label"][:]) == {-1}
    other = load_imdb("unsupervised", data_dir=imdb_dir, limit=7, seed=1)
    assert subset["text"][:] != other["text"][:]


def _write_review(folder, name, text):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text, encoding="utf-8")


@pytest.fixture
def acl_tree(tmp_path):
    """A miniature aclImdb/ tree; ids chosen so that string order and numeric order differ."""
    root = tmp_path / "aclImdb"
    _write_review(root / "train" / "neg", "10_2.txt", "neg ten")
    _write_review(root / "train" / "neg", "2_1.txt", "neg two<br /><br />Awful.")
    _write_review(root / "train" / "neg", "1_4.txt", "neg one, Café 😍")
    _write_review(root / "train" / "pos", "3_9.txt", "pos three")
    _write_review(root / "train" / "pos", "0_10.txt", "pos zero")
    _write_review(root / "train" / "pos", "notes.md", "not a review")  # ignored
    _write_review(root / "train" / "unsup", "11_0.txt", "unsup eleven")
    _write_review(root / "train" / "unsup", "9_0.txt", "unsup nine")
    _write_review(root / "test" / "neg", "5_3.txt", "test neg")
    _write_review(root / "test" / "pos", "4_8.txt", "test pos")
    return tmp_path


def test_acl_tree_order_labels_and_text(acl_tree):
    train = load_imdb("train", data_dir=acl_tree)
    assert train["text"][:] == [
        "neg one, Café 😍", "neg two<br /><br />Awful.", "neg ten", "pos zero", "pos three",
    ]
    assert train["label"][:] == [0, 0, 0, 1, 1]
    assert train.features["label"].dtype == "int64"

    unsup = load_imdb("unsupervised", data_dir=acl_tree)
    assert unsup["text"][:] == ["unsup nine", "unsup eleven"] and unsup["label"][:] == [-1, -1]
    # data_dir may also be the aclImdb folder itself.
    test = load_imdb("test", data_dir=acl_tree / "aclImdb")
    assert test["text"][:] == ["test neg", "test pos"] and test["label"][:] == [0, 1]


def test_acl_tree_limit(acl_tree):
    subset = load_imdb("train", data_dir=acl_tree, limit=4, seed=0)
    assert Counter(subset["label"][:]) == {0: 2, 1: 2}
    assert set(subset["text"][:]) <= set(load_imdb("train", data_dir=acl_tree)["text"][:])
    with pytest.raises(ValueError, match="limit=6 asks for 3 examples of label 1, only 2 exist"):
        load_imdb("train", data_dir=acl_tree, limit=6)
    with pytest.raises(ValueError, match="positive"):
        load_imdb("train", data_dir=acl_tree, limit=0)


def test_environment_variable_is_used_when_data_dir_is_none(acl_tree, monkeypatch):
    monkeypatch.setenv("TUNELAB_DATA_DIR", str(acl_tree))
    assert load_imdb("test")["text"][:] == ["test neg", "test pos"]


def test_hub_is_the_last_resort(monkeypatch):
    calls = []

    def fake_load_dataset(name, split):  # stands in for the download: tests stay offline
        calls.append((name, split))
        return datasets.Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [0, 0, 1, 1]})

    monkeypatch.delenv("TUNELAB_DATA_DIR", raising=False)
    monkeypatch.setattr(data.datasets, "load_dataset", fake_load_dataset)
    subset = load_imdb("train", limit=2)
    assert calls == [("stanfordnlp/imdb", "train")]
    assert sorted(subset["label"][:]) == [0, 1]


def test_missing_directory_names_the_path(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        load_imdb("train", data_dir=missing)


def test_directory_without_imdb_files_says_what_was_expected(tmp_path):
    (tmp_path / "aclImdb" / "train" / "neg").mkdir(parents=True)  # pos/ is missing
    with pytest.raises(FileNotFoundError, match=r"train\.parquet.*aclImdb/train/pos/"):
        load_imdb("train", data_dir=tmp_path)
    (tmp_path / "aclImdb" / "train" / "pos").mkdir()
    with pytest.raises(FileNotFoundError, match="no review files"):
        load_imdb("train", data_dir=tmp_path)


def test_parquet_with_wrong_columns_is_rejected(tmp_path):
    pq.write_table(pa.table({"review": ["x"], "sentiment": [1]}), tmp_path / "train.parquet")
    with pytest.raises(ValueError, match=r"train\.parquet.*expected \['text', 'label'\]"):
        load_imdb("train", data_dir=tmp_path)


def test_unknown_split():
    with pytest.raises(ValueError, match="'validation'"):
        load_imdb("validation", data_dir=".")


def _toy(n_negative=70, n_positive=30):
    labels = [0] * n_negative + [1] * n_positive
    texts = [f"review {i}" for i in range(len(labels))]
    return datasets.Dataset.from_dict({"text": texts, "label": labels})


def test_split_is_stratified_disjoint_and_complete():
    train, validation = train_validation_split(_toy(), validation_size=0.1, seed=0)
    assert len(train) == 90 and len(validation) == 10
    assert Counter(validation["label"][:]) == {0: 7, 1: 3}  # the 70/30 ratio is kept
    train_texts, validation_texts = set(train["text"][:]), set(validation["text"][:])
    assert not train_texts & validation_texts
    assert train_texts | validation_texts == set(_toy()["text"][:])


def test_split_sizes_add_up_with_uneven_classes():
    train, validation = train_validation_split(_toy(5, 8), validation_size=4, seed=0)
    assert len(validation) == 4 and len(train) == 9
    # Shares are 1.54 and 2.46: floors 1 + 2, the larger remainder (label 0) gets the 4th.
    assert Counter(validation["label"][:]) == {0: 2, 1: 2}


def test_split_is_seeded():
    first = train_validation_split(_toy(), seed=0)[1]["text"][:]
    assert train_validation_split(_toy(), seed=0)[1]["text"][:] == first
    assert train_validation_split(_toy(), seed=1)[1]["text"][:] != first


def test_split_on_real_imdb(imdb_dir):
    train, validation = train_validation_split(load_imdb("train", imdb_dir, limit=200), 0.25)
    assert Counter(validation["label"][:]) == {0: 25, 1: 25} and len(train) == 150


def test_split_refuses_test_data_and_bad_sizes(imdb_dir):
    with pytest.raises(ValueError, match="never from test"):
        train_validation_split(load_imdb("test", imdb_dir, limit=20))
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        train_validation_split(_toy(), validation_size=1.5)
    with pytest.raises(ValueError, match="gives 100 of 100"):
        train_validation_split(_toy(), validation_size=100)
