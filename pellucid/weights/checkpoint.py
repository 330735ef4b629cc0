"""Training checkpoints: safetensors for tensors, JSON for everything else, never pickle.

A checkpoint is a folder `run_dir/checkpoints/step_000123/` holding

    model.safetensors   the weights (a tied weight stored once; its aliases in the metadata)
    optim.safetensors   AdamW moments and step counts, flattened to `state.<param>.<name>`
    state.json          step, RNG states (as plain ints), sampler position, metrics tail, the
                        optimizer's param groups
    config.json         the resolved run config;  tokenizer.json: the tokenizer (when there is one)
    manifest.json       sha256 and size of every file above, written LAST

An FSDP2 run writes `shard-{r}-of-{N}.safetensors` (every rank its own pieces of the weights and
moments) and `shards.json` (their index) instead of model/optim.safetensors: weights/sharded.py.
Every reader here accepts both layouts, so one process loads either.

The folder is written under a temporary name and renamed into place only when complete, and each
file inside is itself written atomically, so a kill at any moment leaves the previous checkpoint
untouched and at most a `.tmp-*` folder that the next save removes. A checkpoint counts only if
its manifest exists and every checksum matches: `latest_good` walks back from the newest one and
warns about each it has to skip.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save
from torch import Tensor, nn

from pellucid import files as _files
from pellucid.errors import CheckpointError, CheckpointWriteError, TrainingError, WeightsFormatError
from pellucid.files import _fsync_dir, atomic_write, sha256_file
from pellucid.weights import sharded
from pellucid.weights.safety import check_finite, load_safetensors, read_safetensors_header

log = logging.getLogger("pellucid")

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
FORMAT = "pellucid-checkpoint/1"
REQUIRED = ("model.safetensors", "state.json")  # a sharded checkpoint: shards.json, state.json
_NAME = re.compile(r"^step_(\d+)$")
_WRITE_ERRORS = {
    errno.ENOSPC: "no space left on device",
    getattr(errno, "EDQUOT", errno.ENOSPC): "no space left on device",  # over quota
    errno.EFBIG: "file too large",
}

# What the readers below rely on, with its types (pellucid.files.check_shape), checked before use.
MANIFEST_SHAPE = {"format": str, "step": int, "files": {"*": {"sha256": str, "bytes": int}}}
NUMBER = (int, float)
RNG_SHAPE = {
    "python": list,
    "numpy": {"bit_generator": str, "state": {"key": [int], "pos": int}},
    "torch": [int],
    "cuda?": [[int]],
}
STATE_SHAPE = {"step": int, "optimizer?": {"param_groups": [dict], "scalars": dict}}
# state.json as train/trainer.py writes it: all that a resume reads.
RESUME_SHAPE = {
    **STATE_SHAPE,
    "train_state": {
        "step": int, "tokens": int, "flops": NUMBER, "train_time_s": NUMBER,
        "nonfinite_streak": int, "last_eval": dict,
    },
    "rng": RNG_SHAPE,
    "sampler?": dict,
}  # fmt: skip


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The complete-looking checkpoint folders of a run, oldest first (by step number)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


# --- what goes into the files ---------------------------------------------------------------------


def model_tensors(
    model: nn.Module, state: dict[str, Tensor] | None = None
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The model's state dict with each shared tensor kept once, plus {alias: kept name}.

    Tied embeddings make `lm_head.weight` and the embedding the same tensor; safetensors stores
    every tensor once, so the second name is recorded as an alias instead. `state`: the tensors
    to store in place of the model's own (an FSDP2 rank's local shards, train/distributed.py),
    whose names alone show no sharing; the aliases then come from the model's tied parameters.
    """
    frozen = frozen_names(model)
    if state is not None:
        aliases = tied_aliases(model)
        skip = aliases.keys() | frozen
        kept = {n: t.detach().to("cpu").contiguous() for n, t in state.items() if n not in skip}
        return kept, aliases
    tensors: dict[str, Tensor] = {}
    aliases = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, t in model.state_dict().items():
        if name in frozen:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().to("cpu", copy=True).contiguous()
    return tensors, aliases


def frozen_names(model: nn.Module) -> set[str]:
    """Names of the frozen parameters when some parameters train (LoRA, a classifier's last
    blocks): those belong to the base model the run names, so checkpoints leave them out.
    Empty when everything trains, or nothing does (a plain model, saved whole)."""
    params = list(model.named_parameters(remove_duplicate=False))
    frozen = {n for n, p in params if not p.requires_grad}
    return frozen if len(frozen) < len(params) else set()


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """{second name: first name} of every parameter registered under two names (tied weights)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def optimizer_tensors(
    optimizer: torch.optim.Optimizer | None, sd: dict[str, Any] | None = None
) -> tuple[dict[str, Tensor], dict]:
    """Flatten an optimizer state dict (`sd`, else the optimizer's own) into named tensors and a
    JSON-safe rest."""
    sd = optimizer.state_dict() if sd is None else sd
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], rest: dict
) -> None:
    """Inverse of `optimizer_tensors`: load the flattened state back into `optimizer`."""
    try:
        optimizer.load_state_dict(optimizer_state_dict(optimizer, tensors, rest))
    except (ValueError, KeyError, TypeError, RuntimeError) as e:  # saved for another model
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"the saved optimizer state does not fit this model ({why})"
        ) from None


def optimizer_state_dict(
    optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], rest: dict
) -> dict[str, Any]:
    """The index-keyed optimizer state dict that `optimizer_tensors` flattened."""
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    for name, value in rest["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = []
    for saved, current in zip(rest["param_groups"], optimizer.param_groups, strict=True):
        # JSON turned tuples (betas) into lists; give them back the type the optimizer uses.
        groups.append(
            {k: tuple(v) if isinstance(current.get(k), tuple) else v for k, v in saved.items()}
        )
    return {"state": state, "param_groups": groups}


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU, CUDA) generator states as JSON-safe ints and lists.

    NumPy's state is taken as its dict form (`legacy=False`), never the `get_state()` tuple that
    only pickle can carry.
    """
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    out: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {
            **np_state,
            "state": {"key": np_state["state"]["key"].tolist(), "pos": np_state["state"]["pos"]},
        },
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured (CheckpointError when the saved states do not fit)."""
    try:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        np_state = dict(state["numpy"])
        key = np.array(np_state["state"]["key"], dtype=np.uint32)
        np.random.set_state({**np_state, "state": {"key": key, "pos": np_state["state"]["pos"]}})
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(
                [torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]]
            )
    except (ValueError, TypeError, KeyError, RuntimeError, OverflowError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"state.json: field 'rng' does not restore ({why:.120})") from None


# --- writing ---------------------------------------------------------------------------------------


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    files: dict[str, bytes | str] | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` of `run_dir` atomically and keep only the newest `keep` ones.

    `state` is any JSON-able dict (step, RNG, sampler...); `files` are extra files to include
    verbatim (config.json, tokenizer.json). Refuses (TrainingError) to write non-finite tensors.
    A failing write (disk full, file-size limit) raises CheckpointWriteError and leaves every
    earlier checkpoint as it was.
    """
    weights, aliases = model_tensors(model)
    optim, optim_rest = ({}, None)
    if optimizer is not None:
        optim, optim_rest = optimizer_tensors(optimizer)
    try:
        check_finite(weights, "model")
        check_finite(optim, "optimizer state")
    except WeightsFormatError as e:
        raise TrainingError(f"refusing to write checkpoint step_{step:06d}: {e}") from None
    payload: dict[str, bytes | str] = {
        "model.safetensors": save(weights, metadata={"aliases": json.dumps(aliases)}),
        "state.json": json.dumps({**state, "step": step, "optimizer": optim_rest}),
        **(files or {}),
    }
    if optimizer is not None:
        payload["optim.safetensors"] = save(optim)
    tmp = begin_checkpoint(run_dir, step, str(os.getpid()))
    return commit_checkpoint(tmp, step, payload, keep=keep)


def begin_checkpoint(run_dir: Path, step: int, tag: str) -> Path:
    """The empty temporary folder `.tmp-step_N-{tag}` a checkpoint is written into (leftovers of
    killed runs removed first). The ranks of a sharded save share one `tag`."""
    final = checkpoint_path(run_dir, step)
    tmp = staging_path(run_dir, step, tag)
    with _write_errors(tmp, final):
        tmp.parent.mkdir(parents=True, exist_ok=True)
        _clean_leftovers(tmp.parent)
        tmp.mkdir()
    return tmp


def staging_path(run_dir: Path, step: int, tag: str) -> Path:
    """Where checkpoint `step` is written before it is renamed into place."""
    final = checkpoint_path(run_dir, step)
    return final.parent / f".tmp-{final.name}-{tag}"


def commit_checkpoint(
    tmp: Path,
    step: int,
    payload: dict[str, bytes | str],
    written: dict[str, dict[str, Any]] | None = None,
    keep: int = 2,
) -> Path:
    """Write `payload` into `tmp`, then the manifest (over those files and the ones already
    `written` there, {name: {"sha256", "bytes"}}: a sharded save's shards), LAST; rename `tmp`
    into place and keep the newest `keep` checkpoints."""
    final = tmp.parent / f"step_{step:06d}"
    root = final.parent
    with _write_errors(tmp, final):
        for name, data in payload.items():
            atomic_write(tmp / name, data)
        listed = {
            n: {"sha256": sha256_file(tmp / n), "bytes": (tmp / n).stat().st_size} for n in payload
        }
        manifest = {"format": FORMAT, "step": step, "files": {**(written or {}), **listed}}
        atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=1))
        if final.exists():  # a stale or corrupt one of the same step: move it out of the way first
            os.replace(final, root / f".trash-{final.name}-{os.getpid()}")
        os.replace(tmp, final)
        _fsync_dir(root)
    _purge(root, keep)
    return final


@contextlib.contextmanager
def _write_errors(tmp: Path, final: Path) -> Iterator[None]:
    """A failing write (disk full, file-size limit) -> CheckpointWriteError; `tmp` removed."""
    try:
        yield
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        why = _WRITE_ERRORS.get(e.errno, e.strerror)
        raise CheckpointWriteError(
            f"cannot write checkpoint {final}: {why}; the previous checkpoint is intact"
        ) from None


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """Where checkpoint `step` of `run_dir` lives once written."""
    return Path(run_dir) / CHECKPOINTS / f"step_{step:06d}"


def _clean_leftovers(root: Path) -> None:
    """Remove half-written (`.tmp-*`) and half-deleted (`.trash-*`) folders of killed runs."""
    for p in root.iterdir():
        if p.name.startswith((".tmp-", ".trash-")):
            shutil.rmtree(p, ignore_errors=True)


def _purge(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (renamed first, so a kill mid-way is harmless)."""
    for old in checkpoint_dirs(root.parent)[: -max(1, keep)]:
        trash = root / f".trash-{old.name}-{os.getpid()}"
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)


def set_aside_after(run_dir: Path, step: int) -> None:
    """Rename checkpoints newer than `step` to `step_N.unusable` (a resume from `step` replaces them)."""
    for p in checkpoint_dirs(run_dir):
        if int(_NAME.match(p.name).group(1)) > step:
            log.warning("setting aside %s: resuming from step %d", p, step)
            os.replace(p, p.with_name(p.name + ".unusable"))


# --- reading ---------------------------------------------------------------------------------------


def verify(path: Path) -> dict[str, Any]:
    """Check a checkpoint folder against its manifest; returns the manifest or raises CheckpointError."""
    path = Path(path)
    if not (path / MANIFEST).exists():
        raise CheckpointError(f"{path}: no {MANIFEST} (incomplete write)")
    manifest = read_json(path / MANIFEST, MANIFEST_SHAPE)
    files = manifest["files"]
    if manifest["format"] != FORMAT:
        raise CheckpointError(f"{path}: {MANIFEST} is not a {FORMAT} manifest")
    for name in (sharded.INDEX, "state.json") if sharded.INDEX in files else REQUIRED:
        if name not in files:
            raise CheckpointError(f"{path}: manifest lists no {name}")
    for name, info in files.items():
        f = path / Path(name).name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if f.stat().st_size != info["bytes"]:
            raise CheckpointError(
                f"{path}: {name} has {f.stat().st_size} bytes, expected {info['bytes']}"
            )
        if sha256_file(f) != info["sha256"]:
            raise CheckpointError(f"{path}: {name} fails its sha256 check")
    return manifest


def latest_good(run_dir: Path) -> Path | None:
    """The newest checkpoint of `run_dir` that passes `verify`, warning about each newer bad one."""
    for path in reversed(checkpoint_dirs(run_dir)):
        try:
            verify(path)
            return path
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s; falling back to the previous one", e)
    return None


def read_model_weights(path: Path, *, allow_nonfinite: bool = False) -> dict[str, Tensor]:
    """The checkpoint's weights as a full state dict, tied aliases filled in again: from
    `path/model.safetensors`, or reassembled from a sharded checkpoint's pieces."""
    path = Path(path)
    file = path / (sharded.INDEX if (path / sharded.INDEX).is_file() else "model.safetensors")
    try:
        if file.name == sharded.INDEX:
            reader = sharded.ShardReader(path)
            tensors, aliases = reader.read_section("model"), reader.aliases
            if not allow_nonfinite:
                check_finite(tensors, file.name)
        else:
            tensors = load_safetensors(file, allow_nonfinite=allow_nonfinite)
            aliases = json.loads(read_safetensors_header(file)[1].get("aliases", "{}"))
            _files.check_shape(aliases, {"*": str}, f"{file} metadata 'aliases'", CheckpointError)
    except (WeightsFormatError, ValueError) as e:
        raise CheckpointError(f"cannot load {file}: {e}") from None
    tensors.update({alias: tensors[name] for alias, name in aliases.items() if name in tensors})
    return tensors


def load_model_weights(path: Path, model: nn.Module) -> None:
    """Load `path/model.safetensors` into `model` (all keys must match; aliases re-tied)."""
    file = Path(path) / "model.safetensors"
    tensors = read_model_weights(path)
    missing, unexpected = _key_diff(model, tensors)
    if missing or unexpected:
        raise CheckpointError(
            f"{file} does not fit the model: missing {missing}, unexpected {unexpected}"
        )
    try:
        model.load_state_dict(tensors, strict=not frozen_names(model))
    except RuntimeError as e:
        raise CheckpointError(
            f"{file} does not fit the model: {str(e).splitlines()[-1].strip()}"
        ) from None


def _key_diff(model: nn.Module, tensors: dict[str, Tensor]) -> tuple[list[str], list[str]]:
    want = set(model.state_dict()) - frozen_names(model)
    return sorted(want - set(tensors)), sorted(set(tensors) - want)


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    shape: dict[str, Any] = STATE_SHAPE,
) -> dict[str, Any]:
    """Load weights (and optimizer state) from checkpoint folder `path`; returns its state.json,
    checked against `shape` (RESUME_SHAPE: all a training resume reads) before anything is loaded."""
    path = Path(path)
    state = read_state(path, shape)
    load_model_weights(path, model)
    if optimizer is not None:
        restore_optimizer(optimizer, *read_optimizer(path, state))
    return state


def read_optimizer(path: Path, state: dict[str, Any]) -> tuple[dict[str, Tensor], dict]:
    """The flattened optimizer tensors (whole, from either layout) and their JSON rest (see
    `optimizer_tensors`)."""
    path = Path(path)
    if (path / sharded.INDEX).is_file() and state.get("optimizer") is not None:
        return sharded.ShardReader(path).read_section("optim"), state["optimizer"]
    if not (path / "optim.safetensors").is_file() or state.get("optimizer") is None:
        raise CheckpointError(f"{path} holds no optimizer state; cannot resume training from it")
    try:
        tensors = load_safetensors(path / "optim.safetensors")
    except WeightsFormatError as e:
        raise CheckpointError(f"cannot load the optimizer state: {e}") from None
    return tensors, state["optimizer"]


def read_state(path: Path, shape: dict[str, Any] = STATE_SHAPE) -> dict[str, Any]:
    """A checkpoint's state.json, checked against `shape`."""
    return read_json(Path(path) / "state.json", shape)


def read_json(path: Path, shape: Any = None) -> Any:
    """A JSON file of a run or checkpoint (files.read_json), as CheckpointError when missing,
    malformed or not of `shape`."""
    return _files.read_json(path, CheckpointError, shape=shape)
