"""Training checkpoints: safetensors + JSON (never pickle), verified by sha256, written atomically.

A checkpoint is a folder:
    model.safetensors      the model's state_dict (tied tensors stored once; the alias names go into the
                           safetensors metadata as {alias: kept name}, the convention of safetensors.torch);
                           with `trainable_only`, only the parameters that train and the buffers: a LoRA
                           run's checkpoint holds its adapters, not another copy of the frozen model
    optimizer.safetensors  optimizer state tensors named "<parameter index>.<name>", e.g. "3.exp_avg"
    rng.safetensors        the torch CPU generator state ("torch") and CUDA ones ("cuda.<i>")
    state.json             everything else: optimizer param_groups and scalar state, scheduler state,
                           Python and NumPy RNG states, the caller's trainer state, and the size and
                           sha256 of every file above
It is first written into a hidden sibling folder, then renamed into place (`tunelab.core.io.atomic_folder`),
so a crash mid-write leaves the previous checkpoint untouched.
"""

import json
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tunelab.core.io import atomic_folder, file_digest, read_safetensors, recover_folder, write_bytes, \
    write_safetensors

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "state.json"
FORMAT = "tunelab-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, altered, or does not fit the model it is loaded into."""


def save_checkpoint(path, model: nn.Module, optimizer=None, scheduler=None, trainer_state=None,
                    *, save_rng: bool = True, trainable_only: bool = False) -> Path:
    """Write a checkpoint folder at `path` atomically, replacing any previous one.

    Args:
        path: the checkpoint folder, e.g. out_dir/checkpoints/last.
        model: its state_dict goes to model.safetensors.
        optimizer, scheduler: optional; optimizer tensors go to safetensors, the rest to JSON.
        trainer_state: optional JSON-serialisable dict (step, epoch, history...), stored as is.
        save_rng: also store the torch, CUDA, NumPy and Python RNG states (needed for exact resume).
        trainable_only: store only the parameters with requires_grad (and buffers). Loading then fills
            just those, so the model must be rebuilt with the same frozen weights first (the pretrained ones).
    """
    path = Path(path)
    with atomic_folder(path, replace=True) as tmp:
        state = {"format": FORMAT, "version": VERSION, "trainer": trainer_state or {}, "files": {},
                 "trainable_only": trainable_only}
        tensors, aliases = _dedupe_shared(_state_dict(model, trainable_only))
        state["files"][MODEL_FILE] = _write_tensors(tmp / MODEL_FILE, tensors, aliases)
        if optimizer is not None:
            tensors, state["optimizer"] = _split_optimizer_state(optimizer.state_dict())
            state["files"][OPTIMIZER_FILE] = _write_tensors(tmp / OPTIMIZER_FILE, tensors)
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
        if save_rng:
            tensors, state["rng"] = _capture_rng()
            state["files"][RNG_FILE] = _write_tensors(tmp / RNG_FILE, tensors)
        # state.json is written last: its checksums vouch for the files already on disk.
        write_bytes(tmp / STATE_FILE, json.dumps(state, indent=1).encode())
    return path


def load_checkpoint(path, model: nn.Module | None = None, optimizer=None, scheduler=None,
                    *, restore_rng: bool = False) -> dict:
    """Verify the checkpoint at `path`, load it into whatever is given, and return its state.json.

    Every file is checked against the size and sha256 recorded in state.json before anything is loaded,
    so a truncated or altered checkpoint raises `CheckpointError` naming the file and the problem.
    """
    path = recover_folder(path)
    state = _read_state(path)
    if model is not None:
        _load_weights(model, path / MODEL_FILE, state.get("trainable_only", False))
    if optimizer is not None:
        if OPTIMIZER_FILE not in state["files"]:
            raise CheckpointError(f"{path} holds no optimizer state (it is a weights-only checkpoint)")
        tensors = _read_tensors(path / OPTIMIZER_FILE)[0]
        try:
            optimizer.load_state_dict(_join_optimizer_state(tensors, state["optimizer"]))
        except (ValueError, KeyError, RuntimeError) as error:
            raise CheckpointError(f"{path / OPTIMIZER_FILE} does not fit the optimizer: {error}") from error
    if scheduler is not None:
        if "scheduler" not in state:
            raise CheckpointError(f"{path / STATE_FILE} holds no scheduler state")
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        if RNG_FILE not in state["files"]:
            raise CheckpointError(f"{path} holds no RNG state")
        _restore_rng(_read_tensors(path / RNG_FILE)[0], state["rng"])
    return state


def load_model_weights(model: nn.Module, path) -> nn.Module:
    """Load model.safetensors (or a checkpoint folder holding one) into `model`, in place.

    When a state.json sits beside the file, its size and sha256 are checked first. Missing or unexpected
    keys and shape mismatches raise `CheckpointError` listing them.
    """
    path = Path(path)
    if path.is_dir() or not path.name.endswith(".safetensors"):
        path = recover_folder(path) / MODEL_FILE
    state_file, trainable_only = path.parent / STATE_FILE, False
    if state_file.is_file():
        state = _read_json(state_file)
        expected = state.get("files", {}).get(path.name)
        if expected is not None:
            _verify_file(path, expected)
        trainable_only = state.get("trainable_only", False)
    _load_weights(model, path, trainable_only)
    return model


def _state_dict(model: nn.Module, trainable_only: bool) -> dict:
    """The model's state_dict, or only its trainable parameters and its buffers."""
    tensors = model.state_dict()
    if not trainable_only:
        return tensors
    parameters = dict(model.named_parameters(remove_duplicate=False))  # tied aliases too
    return {k: v for k, v in tensors.items() if k not in parameters or parameters[k].requires_grad}


def _load_weights(model: nn.Module, file: Path, trainable_only: bool = False) -> None:
    tensors, metadata = _read_tensors(file)
    for alias, kept in metadata.items():  # tied weights were stored once
        if alias not in tensors and kept in tensors:
            tensors[alias] = tensors[kept]
    expected = _state_dict(model, trainable_only)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [f"{key}: file {tuple(tensors[key].shape)} vs model {tuple(expected[key].shape)}"
                  for key in expected if key in tensors and tensors[key].shape != expected[key].shape]
    if missing or unexpected or mismatched:
        problems = [f"{label} ({len(keys)}): {_shorten(keys)}" for label, keys in
                    (("missing keys", missing), ("unexpected keys", unexpected),
                     ("shape mismatches", mismatched)) if keys]
        what = "the trainable parameters of " if trainable_only else ""
        raise CheckpointError(f"{file} does not fit {what}{type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(tensors, strict=not trainable_only)


def _read_state(path: Path) -> dict:
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}: expected a folder holding {STATE_FILE}")
    state = _read_json(path / STATE_FILE)
    if state.get("format") != FORMAT or state.get("version", 0) > VERSION:
        raise CheckpointError(f"{path / STATE_FILE} is not a TuneLab checkpoint of version <= {VERSION} "
                              f"(format={state.get('format')!r}, version={state.get('version')!r})")
    for name, expected in state["files"].items():
        _verify_file(path / name, expected)
    return state


def _read_json(file: Path) -> dict:
    if not file.is_file():
        raise CheckpointError(f"missing file {file}: the checkpoint is incomplete")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{file} is not valid JSON ({error}); it is truncated or altered") from error


def _verify_file(file: Path, expected: dict) -> None:
    if not file.is_file():
        raise CheckpointError(f"missing file {file}: it is listed in {STATE_FILE} but not on disk")
    size = file.stat().st_size
    if size != expected["bytes"]:
        raise CheckpointError(f"{file} has {size} bytes but {STATE_FILE} records {expected['bytes']}: "
                              "the file is truncated or was replaced")
    digest = file_digest(file)["sha256"]
    if digest != expected["sha256"]:
        raise CheckpointError(f"{file} fails its sha256 check (got {digest[:12]}..., expected "
                              f"{expected['sha256'][:12]}...): the file was altered or corrupted")


def _read_tensors(file: Path) -> tuple[dict, dict]:
    if not file.is_file():
        raise CheckpointError(f"missing file {file}")
    try:
        return read_safetensors(file, with_metadata=True)
    except ValueError as error:
        raise CheckpointError(str(error)) from error


def _write_tensors(file: Path, tensors: dict, metadata: dict | None = None) -> dict:
    """Write tensors and return the size and sha256 that state.json records for the file."""
    write_safetensors(file, tensors, metadata)
    return file_digest(file)


def _dedupe_shared(state_dict: dict) -> tuple[dict, dict]:
    """safetensors refuses tensors that share memory: keep one name per storage, record the others."""
    tensors, aliases, seen = {}, {}, {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach()
        view = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape,
                tensor.stride(), tensor.dtype) if tensor.numel() else None
        if view in seen:
            aliases[name] = seen[view]
            continue
        if view is not None:
            seen[view] = name
        tensors[name] = tensor.cpu().contiguous()
    # Distinct views of one storage (rare) would still be refused: give those their own memory.
    storages = {}
    for name, tensor in tensors.items():
        if tensor.numel():
            pointer = tensor.untyped_storage().data_ptr()
            if pointer in storages:
                tensors[name] = tensor.clone()
            storages.setdefault(pointer, name)
    return tensors, aliases


def _split_optimizer_state(state_dict: dict) -> tuple[dict, dict]:
    tensors, scalars = {}, {}
    for index, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict, saved: dict) -> dict:
    state = {}
    for key, tensor in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    for index, values in saved["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    # JSON turned tuples such as betas=(0.9, 0.999) into lists; give them back their type.
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
              for group in saved["param_groups"]]
    return {"state": state, "param_groups": groups}


def _capture_rng() -> tuple[dict, dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {"python": [version, list(internal), gauss],
                     "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def _restore_rng(tensors: dict, saved: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors) - 1) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _shorten(items: list, limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")
