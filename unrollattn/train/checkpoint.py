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

A model sharded by FSDP2 (``loop.parallel=fsdp``) is saved by every rank together with
:func:`save_sharded_checkpoint`: model and optimizer state go through ``torch.distributed.checkpoint``
(DCP) into ``sharded/`` (one file per rank plus DCP's ``.metadata``), the index records
``"layout": "sharded"`` and lists those files too; a final checkpoint also holds the full weights as
``model.safetensors``. The whole step directory is written under a temporary name
(``.step_00001000.tmp-<id>``) and renamed into place once complete. Every rank writes and reads
its shard at the same path: the checkpoint directory must be on a filesystem every rank sees.
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
import warnings
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from torch import nn

from ..utils.dist import (
    DistState, barrier, broadcast_object, has_sharded_parameters, main_rank_only, raise_if_any_rank_failed,
    unwrap_model,
)
from ..utils.io import atomic_path, atomic_write_json, sha256_file

__all__ = [
    "load_latest_weights",
    "CheckpointError", "checkpoint_dir_for_step", "latest_checkpoint", "list_checkpoints",
    "load_checkpoint", "load_sharded_checkpoint", "prune_checkpoints", "save_checkpoint", "save_sharded_checkpoint",
    "verify_checkpoint",
]

MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
INDEX_FILE = "checkpoint.json"
FORMAT = "unrollattn-checkpoint"
FORMAT_VERSION = 1
CHECKPOINTS_SUBDIR = "checkpoints"
SHARDED_SUBDIR = "sharded"  # DCP files of a sharded checkpoint
SHARDED_LAYOUT = "sharded"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_STAGING_DIR = re.compile(r"^\.step_\d+\.(tmp|old)-[0-9a-f]+$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt, or does not fit the model it is loaded into."""


# ----------------------------------------------------------------------------------------------
# model weights


def _weights_for_saving(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``state`` (a state dict) with each shared tensor stored once, on the CPU, plus ``{alias: kept_name}``
    metadata."""
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


def _key_problems(saved: dict[str, Any], expected: dict[str, Any], strict: bool) -> list[str]:
    """What keeps a checkpoint's tensors (``saved``: name -> shape, None where unknown) from loading into a model's
    (``expected``): shape mismatches, and with ``strict`` missing and unexpected keys."""
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    mismatched = [k for k in expected if k in saved and saved[k] is not None and expected[k] is not None
                  and tuple(expected[k]) != tuple(saved[k])]
    problems = []
    if mismatched:
        pairs = [f"{k}: checkpoint {tuple(saved[k])} vs model {tuple(expected[k])}" for k in mismatched[:5]]
        more = f" (+{len(mismatched) - 5} more)" if len(mismatched) > 5 else ""
        problems.append(f"shape mismatch for {len(mismatched)} tensor(s): " + "; ".join(pairs) + more)
    if strict and missing:
        problems.append(f"{len(missing)} key(s) of the model missing from the checkpoint: "
                        f"{_describe(missing, expected if all(expected[k] is not None for k in missing) else None)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) in the checkpoint: "
                        f"{_describe(unexpected, saved if all(saved[k] is not None for k in unexpected) else None)}")
    return problems


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
    problems = _key_problems({k: v.shape for k, v in tensors.items()}, {k: v.shape for k, v in expected.items()},
                             strict)
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
    if has_sharded_parameters(model):
        raise CheckpointError(f"{type(unwrap_model(model)).__name__} is sharded (FSDP2): save it with "
                              "save_sharded_checkpoint, called on every rank")
    extra = _checked_step_and_extra(step, extra)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    tensors, aliases = _weights_for_saving(unwrap_model(model).state_dict())
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


def _checked_step_and_extra(step: Any, extra: dict | None) -> dict:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"step: expected an int >= 0, got {step!r}")
    extra = dict(extra or {})
    _check_safe(extra, "extra")
    return extra


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
    if has_sharded_parameters(model):
        raise CheckpointError(f"{type(unwrap_model(model)).__name__} is sharded (FSDP2): load {directory} into it "
                              "with load_sharded_checkpoint, called on every rank")
    index = verify_checkpoint(directory) if verify else _read_index(directory)
    sharded = index.get("layout") == SHARDED_LAYOUT
    if sharded and optimizer is not None:
        raise CheckpointError(f"{directory} is a sharded checkpoint (written with loop.parallel=fsdp): its optimizer "
                              "state loads into a sharded model only; resume the run with loop.parallel=fsdp under "
                              "torchrun (its weights alone load into a plain model, without an optimizer)")
    required = (STATE_FILE,) if sharded else (MODEL_FILE, STATE_FILE)
    for name in required:
        if name not in index["files"] or not (directory / name).exists():
            raise CheckpointError(f"incomplete checkpoint at {directory}: {name} is missing")
    state = _read_trainer_state(directory, map_location)

    if not sharded or MODEL_FILE in index["files"]:
        _load_weights(directory / MODEL_FILE, model, map_location, strict)
    else:
        _load_sharded_weights_into_plain_model(directory, model, strict)
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


def _read_trainer_state(directory: Path, map_location: Any) -> dict[str, Any]:
    try:
        state = torch.load(directory / STATE_FILE, map_location=map_location, weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise CheckpointError(f"cannot read {directory / STATE_FILE}: {err}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{directory / STATE_FILE} is not an unrollattn trainer state")
    return state


# ----------------------------------------------------------------------------------------------
# sharded checkpoints (FSDP2 + torch.distributed.checkpoint)


def _sharded_metadata(directory: Path):
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return FileSystemReader(str(directory / SHARDED_SUBDIR)).read_metadata()
    except Exception as err:  # a missing or unreadable .metadata raises several types
        raise CheckpointError(f"cannot read the DCP metadata of {directory / SHARDED_SUBDIR}: {err}") from None


def _check_sharded_model_keys(directory: Path, metadata: Any, expected: dict[str, Any], strict: bool) -> None:
    """CheckpointError naming the differences between the model entries of a sharded checkpoint's metadata and
    ``expected`` (the model's state dict: names and global shapes)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = {key[len("model."):]: tuple(meta.size) if isinstance(meta, TensorStorageMetadata) else None
             for key, meta in metadata.state_dict_metadata.items() if key.startswith("model.")}
    problems = _key_problems(saved, {k: v.shape if isinstance(v, torch.Tensor) else None for k, v in expected.items()},
                             strict)
    if problems:
        raise CheckpointError(f"sharded checkpoint {directory} does not match the model: " + " | ".join(problems))


def _load_sharded_weights_into_plain_model(directory: Path, model: nn.Module, strict: bool) -> None:
    """The model part of a sharded checkpoint, gathered by this one process into an unsharded ``model``."""
    import torch.distributed.checkpoint as dcp

    target = unwrap_model(model)
    weights = target.state_dict()
    metadata = _sharded_metadata(directory)
    _check_sharded_model_keys(directory, metadata, weights, strict)
    weights = {k: v for k, v in weights.items() if f"model.{k}" in metadata.state_dict_metadata}
    try:
        with warnings.catch_warnings():  # DCP warns that it loads in one process, which is what no_dist asks for
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp.load({"model": weights}, checkpoint_id=str(directory / SHARDED_SUBDIR), no_dist=True)
    except Exception as err:  # DCP wraps reader errors in its own exception types
        raise CheckpointError(f"cannot read the sharded weights of {directory}: {err}") from None
    target.load_state_dict(weights, strict=strict)


def _staging_name(directory: Path, kind: str, token: str) -> Path:
    return directory.parent / f".{directory.name}.{kind}-{token}"


def _listed_files(root: Path) -> dict[str, dict[str, Any]]:
    """``{relative name: {sha256, bytes}}`` of every file under ``root`` but the index."""
    return {path.relative_to(root).as_posix(): {"sha256": sha256_file(path), "bytes": path.stat().st_size}
            for path in sorted(root.rglob("*")) if path.is_file() and path.name != INDEX_FILE}


def save_sharded_checkpoint(directory: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                            scheduler: Any, step: int, state: DistState, extra: dict | None = None,
                            full_weights: bool = False) -> Path:
    """Collective (every rank calls it): write a complete sharded checkpoint of an FSDP2 ``model`` (+ optimizer,
    scheduler, rank 0's RNG) to ``directory``; with ``full_weights`` also the gathered weights as
    ``model.safetensors``. Returns the directory.

    Every rank writes its shard into a temporary sibling directory; rank 0 then checks that it sees every rank's
    files (a filesystem every rank shares), writes the trainer state and the index, and renames the directory into
    place. A failure anywhere leaves an earlier checkpoint at ``directory`` as it was.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    error = None
    try:
        extra = _checked_step_and_extra(step, extra)
    except CheckpointError as err:
        error = err
    raise_if_any_rank_failed(error, state, "save_sharded_checkpoint")
    directory = Path(directory)
    token = broadcast_object(os.urandom(6).hex(), state)
    staging = _staging_name(directory, "tmp", token)
    main_rank_only(state, lambda: (staging / SHARDED_SUBDIR).mkdir(parents=True))

    if optimizer is not None:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        payload = {"model": model_state, "optim": optimizer_state}
    else:
        payload = {"model": get_model_state_dict(model)}
    try:
        dcp.save(payload, checkpoint_id=str(staging / SHARDED_SUBDIR))
        full = (get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
                if full_weights else None)
    except BaseException:
        if state.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        raise

    def finish() -> Path:
        try:
            _check_every_shard_visible(staging)
            if full is not None:
                tensors, aliases = _weights_for_saving(full)
                from safetensors.torch import save_file

                save_file(tensors, str(staging / MODEL_FILE), metadata={**aliases, "format": "pt"})
            torch.save({
                "format": FORMAT, "version": FORMAT_VERSION, "layout": SHARDED_LAYOUT, "step": step, "extra": extra,
                "rng": _rng_state(), "world_size": state.world_size, "optimizer": None,
                "sharded_optimizer": optimizer is not None,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
            }, staging / STATE_FILE)
            atomic_write_json(staging / INDEX_FILE, {
                "format": FORMAT, "version": FORMAT_VERSION, "layout": SHARDED_LAYOUT, "step": step,
                "world_size": state.world_size, "files": _listed_files(staging),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            })
            _move_into_place(staging, directory, token)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return directory

    return main_rank_only(state, finish)


def _check_every_shard_visible(staging: Path) -> None:
    """CheckpointError when a shard file that DCP's metadata names is missing here: the ranks do not share the
    checkpoint filesystem (each node wrote its shard to its own disk)."""
    metadata = _sharded_metadata(staging)
    names = sorted({info.relative_path for info in metadata.storage_data.values()})
    missing = [name for name in names if not (staging / SHARDED_SUBDIR / name).is_file()]
    if missing:
        raise CheckpointError(f"rank 0 does not see the shard file(s) {', '.join(missing)} that other ranks wrote to "
                              f"{staging / SHARDED_SUBDIR}: put loop.out_dir on a filesystem every rank (every node) "
                              "shares; no checkpoint was written")


def _move_into_place(staging: Path, directory: Path, token: str) -> None:
    """Rename the complete ``staging`` directory to ``directory``; an existing ``directory`` is moved aside first
    and deleted only once the new one is in place."""
    previous = None
    if directory.exists():
        previous = _staging_name(directory, "old", token)
        os.replace(directory, previous)
    os.replace(staging, directory)
    if previous is not None:
        with contextlib.suppress(FileNotFoundError):
            (previous / INDEX_FILE).unlink()
        shutil.rmtree(previous, ignore_errors=True)


def load_sharded_checkpoint(directory: str | os.PathLike, *, model: nn.Module,
                            optimizer: torch.optim.Optimizer | None, scheduler: Any, state: DistState,
                            verify: bool = False) -> dict[str, Any]:
    """Collective: load a checkpoint written by :func:`save_sharded_checkpoint` into an FSDP2 ``model`` (and its
    optimizer / scheduler). Returns ``{"step": int, "extra": dict}``. The number of ranks may differ from the
    saving run's (DCP reshards). Every rank reads ``directory`` at the same path; a rank that cannot, or a
    checkpoint that does not fit the model, raises CheckpointError on every rank before anything is loaded."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict,
    )

    directory = Path(directory)
    trainer_state, error = None, None
    if optimizer is not None:
        model_state, optimizer_state = get_state_dict(model, optimizer)
    else:
        model_state, optimizer_state = get_model_state_dict(model), None
    try:
        index = verify_checkpoint(directory) if verify else _read_index(directory)
        if index.get("layout") != SHARDED_LAYOUT:
            raise CheckpointError(f"{directory} is a single-file checkpoint (written with loop.parallel=ddp or in one "
                                  "process), not a sharded one: resume the run with loop.parallel=ddp")
        trainer_state = _read_trainer_state(directory, "cpu")
        if optimizer is not None and not trainer_state.get("sharded_optimizer"):
            raise CheckpointError(f"checkpoint {directory} has no optimizer state (it was saved without an optimizer)")
        if scheduler is not None and trainer_state.get("scheduler") is None:
            raise CheckpointError(f"checkpoint {directory} has no scheduler state (it was saved without a scheduler)")
        _check_sharded_model_keys(directory, _sharded_metadata(directory), model_state, strict=True)
    except CheckpointError as err:
        error = CheckpointError(f"rank {state.rank}: {err}" if state.world_size > 1 else str(err))
    except OSError as err:
        error = CheckpointError(f"rank {state.rank} cannot read {directory} ({err}): checkpoints must be on a "
                                "filesystem every rank sees at the same path")
    raise_if_any_rank_failed(error, state, f"loading {directory}")

    payload = {"model": model_state, **({"optim": optimizer_state} if optimizer is not None else {})}
    try:
        dcp.load(payload, checkpoint_id=str(directory / SHARDED_SUBDIR))
    except Exception as err:  # DCP raises its own exception types, on every rank alike
        raise CheckpointError(f"the sharded state in {directory} does not fit this model / optimizer: {err}") from None
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
    else:
        set_model_state_dict(model, model_state)
    if scheduler is not None:
        try:
            scheduler.load_state_dict(trainer_state["scheduler"])
        except (ValueError, KeyError, RuntimeError, TypeError) as err:
            raise CheckpointError(f"scheduler state in {directory} does not fit this scheduler: {err}") from None
    barrier(state)
    return {"step": int(trainer_state["step"]), "extra": trainer_state.get("extra") or {}}


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
        if _STAGING_DIR.match(child.name) and child.is_dir():  # left by a sharded save that did not finish
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
            continue
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
