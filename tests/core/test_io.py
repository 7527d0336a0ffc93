"""Tests for tunelab/core/io.py: safetensors in and out, folders that appear whole or not at all."""

import hashlib
import stat

import pytest
import torch

from tunelab.core.io import atomic_folder, file_digest, read_safetensors, recover_folder, write_safetensors


def test_tensors_and_metadata_round_trip_exactly_readable_by_everyone(tmp_path):
    tensors = {"w": torch.randn(3, 4), "b": torch.arange(5), "view": torch.randn(4, 6)[:, 1:3]}  # non-contiguous
    write_safetensors(tmp_path / "t.safetensors", tensors, {"note": "x"})
    loaded, metadata = read_safetensors(tmp_path / "t.safetensors", with_metadata=True)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor)
    assert metadata == {"format": "pt", "note": "x"}
    assert stat.S_IMODE((tmp_path / "t.safetensors").stat().st_mode) == 0o644


def test_a_missing_file_names_the_pickles_beside_it_and_a_corrupt_one_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickled")
    with pytest.raises(FileNotFoundError, match=r"pytorch_model\.bin.*never loaded"):
        read_safetensors(tmp_path / "model.safetensors")
    write_safetensors(tmp_path / "model.safetensors", {"w": torch.ones(100)})
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_safetensors(tmp_path / "model.safetensors")


def test_file_digest_is_the_size_and_sha256(tmp_path):
    (tmp_path / "f").write_bytes(b"tunelab" * 1000)
    assert file_digest(tmp_path / "f") == {"bytes": 7000, "sha256": hashlib.sha256(b"tunelab" * 1000).hexdigest()}


def test_a_new_folder_appears_only_when_the_block_succeeds(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "out") as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor the hidden temporary one
    with atomic_folder(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("whole")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "a.txt").read_text() == "whole"


def test_updating_keeps_the_other_files_and_replacing_swaps_the_whole_folder(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "run.json").write_text("{}")
    (folder / "model.safetensors").write_text("old")
    with atomic_folder(folder) as tmp:
        (tmp / "model.safetensors").write_text("new")
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "run.json"]
    assert (folder / "model.safetensors").read_text() == "new"
    with pytest.raises(RuntimeError):
        with atomic_folder(folder, replace=True) as tmp:
            (tmp / "state.json").write_text("half")
            raise RuntimeError("crash")
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "run.json"]  # untouched
    with atomic_folder(folder, replace=True) as tmp:
        (tmp / "state.json").write_text("{}")
    assert [p.name for p in folder.iterdir()] == ["state.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no backup or temporary folder left behind


def test_recover_folder_finds_the_backup_of_a_swap_that_died_between_its_renames(tmp_path):
    folder, backup = tmp_path / "last", tmp_path / ".last.old"
    backup.mkdir()
    (backup / "state.json").write_text("{}")
    (tmp_path / ".last.tmp-abc").mkdir()  # a write that never finished
    assert recover_folder(folder) == backup  # a reader uses the backup and changes nothing
    assert backup.is_dir() and not folder.exists()
    assert recover_folder(folder, clean=True) == folder  # the writer puts it back and tidies up
    assert [p.name for p in tmp_path.iterdir()] == ["last"] and (folder / "state.json").is_file()
