"""Files on disk: safetensors tensors and folders that appear all at once or not at all.

Every weight TuneLab writes or reads goes through here: model folders (`hub`), training checkpoints
(`checkpoint`) and adapter folders (`tunelab.peft.saving`). Two rules hold for all of them:

- tensors are safetensors, never pickles: a `*.bin` file is named in the error and never loaded;
- a folder is written into a hidden sibling and renamed into place, so a crash leaves the old one intact.

    with atomic_folder("out/model") as tmp:          # files land in out/model only if the block succeeds
        write_safetensors(tmp / "model.safetensors", model.state_dict())
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from pathlib import Path

import safetensors.torch
from safetensors import safe_open
from torch import Tensor


def write_safetensors(file: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write contiguous CPU copies of `tensors` to `file`, flushed to disk and readable by everyone
    (safetensors' save_file creates it owner-only). Tensors sharing memory (tied weights) are stored as copies,
    which safetensors requires."""
    seen, own = set(), {}
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        storage = t.untyped_storage().data_ptr()
        own[name] = t.clone() if storage in seen else t
        seen.add(storage)
    tensors = own
    safetensors.torch.save_file(tensors, str(file), metadata={"format": "pt", **(metadata or {})})
    _fsync(file)
    os.chmod(file, 0o644)


def read_safetensors(file: str | Path, with_metadata: bool = False):
    """The tensors of a safetensors file (and its metadata dict with `with_metadata`).

    A missing file is a FileNotFoundError that names any pickles beside it (never loaded); a truncated or
    corrupt one is a ValueError naming the file.
    """
    file = Path(file)
    if not file.is_file():
        pickled = sorted(p.name for p in file.parent.glob("*.bin")) if file.parent.is_dir() else []
        hint = f" (found {pickled}: pickled weights are never loaded; convert them to safetensors)" if pickled else ""
        raise FileNotFoundError(f"{file.parent} has no {file.name}{hint}")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
            metadata = f.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for bad headers and sizes
        raise ValueError(f"{file} is not a readable safetensors file ({error}); it is truncated or corrupted") \
            from error
    return (tensors, metadata) if with_metadata else tensors


def write_bytes(file: str | Path, data: bytes) -> None:
    """Write `data` to `file` and make sure it is on disk before anything (a rename) makes it visible."""
    with open(file, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def file_digest(file: str | Path) -> dict:
    """{"bytes": size, "sha256": hex digest} of a file: what a checkpoint records to detect damage later."""
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"bytes": Path(file).stat().st_size, "sha256": digest.hexdigest()}


@contextlib.contextmanager
def atomic_folder(folder: str | Path, replace: bool = False):
    """Yield a hidden sibling folder to write into; when the block succeeds its files move into `folder`.

    A new `folder` appears all at once. An existing one is either updated file by file, each file an atomic
    rename, its other files kept (`replace=False`: a model folder beside a run's other files), or swapped
    whole (`replace=True`: a checkpoint). A folder cannot be renamed over a non-empty one, so the old folder
    is first moved aside to `.<name>.old`; `recover_folder` finds it if the process died between the two
    renames. If the block raises, the partial files are deleted and `folder` is untouched.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    if replace:
        recover_folder(folder, clean=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:12]}")
    tmp.mkdir()
    try:
        yield tmp
        if replace:
            _swap_into_place(tmp, folder)
        elif folder.exists():
            for item in tmp.iterdir():
                os.replace(item, folder / item.name)
            tmp.rmdir()
        else:
            os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def recover_folder(folder: str | Path, clean: bool = False) -> Path:
    """Where the good copy of a `replace=True` folder is after a crash: `folder`, or its `.old` backup when
    the process died between moving the old one aside and renaming the new one in. With `clean` (the writer),
    the backup is put back and the leftovers of writes that never finished are deleted."""
    folder = Path(folder)
    backup = folder.with_name(f".{folder.name}.old")
    if backup.is_dir() and not folder.exists():
        if not clean:
            return backup
        os.replace(backup, folder)
    if clean:
        shutil.rmtree(backup, ignore_errors=True)
        for stale in folder.parent.glob(f".{folder.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    return folder


def _swap_into_place(tmp: Path, folder: Path) -> None:
    backup = folder.with_name(f".{folder.name}.old")
    if folder.exists():
        os.replace(folder, backup)
    os.replace(tmp, folder)
    shutil.rmtree(backup, ignore_errors=True)
    if hasattr(os, "O_DIRECTORY"):  # make the renames durable (POSIX only)
        fd = os.open(folder.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync(file: str | Path) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
