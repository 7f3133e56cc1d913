"""The project's one checkpoint format: safetensors weights + a trainer state, written atomically.

A checkpoint is a directory holding

- ``model.safetensors``: the (unwrapped) model's state_dict; tensors that share memory (tied
  weights) are stored once, the other names recorded in the file metadata as ``alias -> kept``
  (the convention of ``safetensors.torch.save_model``);
- ``trainer_state.pt``: optimizer / scheduler state dicts, step, ``extra`` and RNG states, read
  back with ``torch.load(weights_only=True)``;
- ``checkpoint.json``: step, file names, sizes and sha256, written last. Its presence marks the
  checkpoint complete; the hashes catch a corrupt or mixed directory. The names it lists must be
  regular files inside the checkpoint directory (no absolute path, no ``..``, no symlink leading
  out) of the recorded size, checked before anything is read, so a crafted index cannot make the
  loader read another path.

Every file goes to a temporary sibling first. All temporary files are complete before the first
one is moved into place, so a failure while serializing leaves the previous checkpoint in the
directory untouched; a crash between the final renames is caught on load by the sha256 check.
The trainer writes one directory per step (``checkpoints/step_00001000``) and deletes older ones
only after a newer one is complete, so a complete checkpoint always survives.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import stat
import time
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from torch import nn

from ..utils.dist import unwrap_model
from ..utils.io import atomic_path, atomic_write_json, sha256_file

__all__ = [
    "load_latest_weights",
    "CheckpointError", "checkpoint_dir_for_step", "latest_checkpoint", "list_checkpoints",
    "load_checkpoint", "prune_checkpoints", "save_checkpoint", "verify_checkpoint",
]

MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
INDEX_FILE = "checkpoint.json"
FORMAT = "unrollattn-checkpoint"
FORMAT_VERSION = 1
CHECKPOINTS_SUBDIR = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt, or does not fit the model it is loaded into."""


# ----------------------------------------------------------------------------------------------
# model weights


def _weights_for_saving(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with each shared tensor stored once, plus ``{alias: kept_name}`` metadata."""
    state = unwrap_model(model).state_dict()
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: dict[tuple, list[str]] = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"state_dict entry {name!r} is a {type(t).__name__}, not a tensor; "
                                  "keep non-tensor state in `extra`")
        t = t.detach()
        if t.device.type == "meta":
            raise CheckpointError(f"state_dict entry {name!r} is on the meta device (no data to save)")
        if t.numel() > 0:
            view = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if view in seen:  # exactly the same tensor under a second name (tied weights)
                aliases[name] = seen[view]
                continue
            seen[view] = name
            storages.setdefault((t.device, t.untyped_storage().data_ptr()), []).append(name)
        tensors[name] = t
    for names in storages.values():
        if len(names) > 1:  # different views of one storage: safetensors needs separate copies
            for name in names:
                tensors[name] = tensors[name].clone()
    tensors = {k: v.to("cpu").contiguous() for k, v in tensors.items()}
    return tensors, aliases


def _describe(names: list[str], shapes: dict[str, Any] | None = None, limit: int = 5) -> str:
    shown = [f"{n} {tuple(shapes[n])}" if shapes is not None else n for n in names[:limit]]
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(shown) + more


def _load_weights(path: Path, model: nn.Module, map_location: Any, strict: bool) -> None:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    device = str(map_location) if map_location is not None else "cpu"
    try:
        tensors = load_file(str(path), device=device)
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None
    for alias, kept in metadata.items():
        if kept in tensors and alias not in tensors:
            tensors[alias] = tensors[kept]

    target = unwrap_model(model)
    expected = target.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    mismatched = [k for k in expected if k in tensors and tuple(expected[k].shape) != tuple(tensors[k].shape)]
    problems = []
    if mismatched:
        pairs = [f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}" for k in mismatched[:5]]
        more = f" (+{len(mismatched) - 5} more)" if len(mismatched) > 5 else ""
        problems.append(f"shape mismatch for {len(mismatched)} tensor(s): " + "; ".join(pairs) + more)
    if strict and missing:
        problems.append(f"{len(missing)} key(s) of the model missing from the checkpoint: "
                        f"{_describe(missing, {k: v.shape for k, v in expected.items()})}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) in the checkpoint: "
                        f"{_describe(unexpected, {k: v.shape for k, v in tensors.items()})}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match model {type(target).__name__}: " + " | ".join(problems))
    target.load_state_dict({k: v for k, v in tensors.items() if k in expected}, strict=strict)


# ----------------------------------------------------------------------------------------------
# RNG state (stored with plain tensors / tuples so that weights_only loading accepts it)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached))
    except ImportError:
        pass
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


_SAFE_LEAVES = (type(None), bool, int, float, str, bytes, torch.Tensor, torch.Size, torch.dtype, torch.device)


def _check_safe(value: Any, where: str) -> None:
    """Reject objects that ``torch.load(weights_only=True)`` would refuse, at save time."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise CheckpointError(f"{where}: dict keys must be str or int, got {type(k).__name__}")
            _check_safe(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_safe(v, f"{where}[{i}]")
    elif not isinstance(value, _SAFE_LEAVES):
        raise CheckpointError(f"{where} is a {type(value).__name__}; checkpoint extras must be plain "
                              "Python values (None, bool, int, float, str, list, tuple, dict) or tensors")


# ----------------------------------------------------------------------------------------------
# save / load


def save_checkpoint(directory: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, step: int, extra: dict | None = None) -> Path:
    """Write a complete checkpoint of ``model`` (+ optimizer, scheduler, RNG) to ``directory``.

    Returns the directory. ``extra`` holds small plain-Python values (e.g. a data cursor or the run
    name) and comes back from :func:`load_checkpoint`.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"step: expected an int >= 0, got {step!r}")
    extra = dict(extra or {})
    _check_safe(extra, "extra")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    tensors, aliases = _weights_for_saving(model)
    trainer_state = {
        "format": FORMAT, "version": FORMAT_VERSION, "step": step, "extra": extra, "rng": _rng_state(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
    }

    from safetensors.torch import save_file

    with contextlib.ExitStack() as stack:
        # Every file is fully written (and hashed) before any replaces its predecessor.
        model_tmp = stack.enter_context(atomic_path(directory / MODEL_FILE))
        save_file(tensors, str(model_tmp), metadata={**aliases, "format": "pt"})
        state_tmp = stack.enter_context(atomic_path(directory / STATE_FILE))
        torch.save(trainer_state, state_tmp)
        files = {
            MODEL_FILE: {"sha256": sha256_file(model_tmp), "bytes": model_tmp.stat().st_size},
            STATE_FILE: {"sha256": sha256_file(state_tmp), "bytes": state_tmp.stat().st_size},
        }
    # Both data files are in place; the index is written last and marks the checkpoint complete.
    atomic_write_json(directory / INDEX_FILE, {
        "format": FORMAT, "version": FORMAT_VERSION, "step": step, "files": files,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    return directory


def _read_index(directory: Path) -> dict[str, Any]:
    if not directory.exists():
        raise CheckpointError(f"no checkpoint at {directory}: the directory does not exist")
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoint at {directory}: not a directory")
    index_path = directory / INDEX_FILE
    if not index_path.exists():
        present = sorted(p.name for p in directory.iterdir())
        raise CheckpointError(f"incomplete checkpoint at {directory}: no {INDEX_FILE} (the save was interrupted "
                              f"or this is not a checkpoint directory; files present: {present or 'none'})")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"corrupt checkpoint at {directory}: cannot parse {INDEX_FILE}: {err}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("files"), dict):
        raise CheckpointError(f"{index_path} is not an unrollattn checkpoint index")
    for name, info in index["files"].items():
        _listed_file(directory, name, info)
    return index


def _listed_file(directory: Path, name: Any, info: Any) -> Path:
    """The path of file ``name`` listed in ``directory``'s index, after checking that it is a relative name inside
    the directory (no absolute path, no ``..``, no symlink leading out), a regular file, and of the recorded size."""
    where = f"{directory / INDEX_FILE} lists"
    if not isinstance(name, str) or not name or "\0" in name:
        raise CheckpointError(f"{where} an invalid file name {name!r}: expected a non-empty relative file name")
    if not isinstance(info, dict):
        raise CheckpointError(f"{where} {name!r} with {info!r}: expected {{'sha256': ..., 'bytes': ...}}")
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or os.path.isabs(name) or PureWindowsPath(name).drive:
        raise CheckpointError(f"{where} the absolute path {name!r}: expected a name relative to the checkpoint directory")
    if ".." in pure.parts:
        raise CheckpointError(f"{where} {name!r}, which contains '..': expected a name inside the checkpoint directory")
    path = directory / name
    try:
        resolved = path.resolve(strict=True)
    except FileNotFoundError:
        raise CheckpointError(f"incomplete checkpoint at {directory}: {name} is listed in {INDEX_FILE} but missing") from None
    except (OSError, RuntimeError) as err:  # symlink loop, permission
        raise CheckpointError(f"cannot resolve {path}: {err}") from None
    if not resolved.is_relative_to(directory.resolve()):
        raise CheckpointError(f"{where} {name!r}, which leads outside the checkpoint directory (to {resolved}); "
                              "expected a file inside it")
    st = resolved.stat()
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{where} {name!r}, which is not a regular file ({resolved})")
    expected = info.get("bytes")
    if expected is not None and expected != st.st_size:
        raise CheckpointError(f"corrupt checkpoint file {path}: {st.st_size} bytes, {INDEX_FILE} records {expected!r} "
                              "(modified, truncated or an interrupted save)")
    return path


def verify_checkpoint(directory: str | os.PathLike) -> dict[str, Any]:
    """Check that every file listed in ``checkpoint.json`` is a regular file inside ``directory`` with the recorded
    size and sha256; return the index."""
    directory = Path(directory)
    index = _read_index(directory)
    for name, info in index["files"].items():
        path = directory / name  # checked by _read_index: inside the directory, a regular file of the recorded size
        digest = sha256_file(path)
        if digest != info.get("sha256"):
            raise CheckpointError(f"corrupt checkpoint file {path}: sha256 {digest[:16]}... does not match "
                                  f"{str(info.get('sha256'))[:16]}... recorded in {INDEX_FILE} (modified, truncated "
                                  "or an interrupted save)")
    return index


def load_checkpoint(directory: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, map_location: Any = "cpu", strict: bool = True,
                    restore_rng: bool = False, verify: bool = True) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` (and optimizer/scheduler).

    Returns ``{"step": int, "extra": dict}``. ``restore_rng`` also restores the Python / numpy /
    torch RNG states of the saving process; ``verify=False`` skips the sha256 check (large files).
    """
    directory = Path(directory)
    index = verify_checkpoint(directory) if verify else _read_index(directory)
    for name in (MODEL_FILE, STATE_FILE):
        if name not in index["files"] or not (directory / name).exists():
            raise CheckpointError(f"incomplete checkpoint at {directory}: {name} is missing")

    try:
        state = torch.load(directory / STATE_FILE, map_location=map_location, weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise CheckpointError(f"cannot read {directory / STATE_FILE}: {err}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{directory / STATE_FILE} is not an unrollattn trainer state")

    _load_weights(directory / MODEL_FILE, model, map_location, strict)
    if optimizer is not None:
        if state.get("optimizer") is None:
            raise CheckpointError(f"checkpoint {directory} has no optimizer state (it was saved without an optimizer)")
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"optimizer state in {directory} does not fit this optimizer: {err}") from None
    if scheduler is not None:
        if state.get("scheduler") is None:
            raise CheckpointError(f"checkpoint {directory} has no scheduler state (it was saved without a scheduler)")
        try:
            scheduler.load_state_dict(state["scheduler"])
        except (ValueError, KeyError, RuntimeError, TypeError) as err:
            raise CheckpointError(f"scheduler state in {directory} does not fit this scheduler: {err}") from None
    if restore_rng and state.get("rng"):
        _set_rng_state(state["rng"])
    return {"step": int(state["step"]), "extra": state.get("extra") or {}}


# ----------------------------------------------------------------------------------------------
# step directories inside a run


def checkpoint_dir_for_step(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_SUBDIR / f"step_{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete step checkpoints (those with a ``checkpoint.json``) of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_SUBDIR
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and child.is_dir() and (child / INDEX_FILE).is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run directory (or ``run_dir`` itself if it is one), else None."""
    run_dir = Path(run_dir)
    if (run_dir / INDEX_FILE).is_file():
        return run_dir
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest complete step checkpoints (and stale incomplete ones older than them)."""
    if keep < 1:
        raise ValueError(f"keep: expected an int >= 1, got {keep!r}")
    complete = list_checkpoints(run_dir)
    if not complete:
        return []
    newest = complete[-keep:]  # fewer than ``keep`` complete ones: all of them stay
    kept = {p for _, p in newest}
    oldest_kept = newest[0][0]
    removed = []
    root = Path(run_dir) / CHECKPOINTS_SUBDIR
    for child in sorted(root.iterdir()):
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and child not in kept and int(match.group(1)) < oldest_kept:
            # The index goes first: a deletion cut short leaves an incomplete directory, never a "complete"
            # one with missing files.
            with contextlib.suppress(FileNotFoundError):
                (child / INDEX_FILE).unlink()
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


def load_latest_weights(run_dir: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Load the weights of ``run_dir``'s latest checkpoint into ``model`` (no optimizer state) and return it."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint in {Path(run_dir) / 'checkpoints'}")
    load_checkpoint(ckpt, model=model)
    return model
