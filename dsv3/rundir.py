"""The training run directory: checkpoints, the ``latest`` pointer, trainer state and the lock (used by
``dsv3.train``; the format is described in its module docstring).

    out_dir/
      .lock                       exists while one process trains into this directory (flock; names its pid)
      latest                      "checkpoint-NNNNNN": the newest complete checkpoint
      checkpoint-NNNNNN/          config.json + model.safetensors (released layout, ``dsv3.load_pretrained``)
                                  trainer.safetensors (AdamW state by parameter name, RNG states)
                                  trainer.json (format, step, train config, data position, MoE layer names, history)

A checkpoint is built in a temporary directory (``.checkpoint-NNNNNN.*.tmp``), every file flushed to disk, renamed
into place, the run directory flushed, and only then does ``latest`` move; older checkpoints are removed by step
number. A killed run leaves at worst a temporary directory, which the next run into the directory removes. Reading
a checkpoint back checks every entry the trainer needs, naming the file and the entry, before any compute.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from pathlib import Path

import torch

from .atomic import atomic_save_file, atomic_write_text, fsync_dir, remove_stale_temporaries, temp_dir_beside
from .checkpoint import save_pretrained

CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
LATEST_FILE = "latest"
LOCK_FILE = ".lock"
TRAINER_JSON, TRAINER_TENSORS = "trainer.json", "trainer.safetensors"
FORMAT = "dsv3-train-v1"
# what trainer.json must hold, with the JSON type of each entry
_STATE_ENTRIES = {
    "format": str,
    "step": int,
    "train_config": dict,
    "data": dict,
    "optimizer": dict,
    "moe_layers": list,
    "history": list,
}


class RunDirectoryError(ValueError):
    """A run directory that cannot be used as asked: locked by another run, unwritable, or holding damaged state."""


# ---------------------------------------------------------------------- the lock
class RunLock:
    """Exclusive use of a run directory by one process (``fcntl.flock`` on ``out_dir/.lock``, released when the
    process ends, however it ends). Taking it also proves up front that the directory can be created and written.

        with RunLock(out_dir):
            ...train and save...
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl

        lock = self.run_dir / LOCK_FILE
        for _ in range(10):  # retried only when the file was replaced between open and flock (see below)
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise RunDirectoryError(
                    f"out_dir {str(self.run_dir)!r} cannot be created or written: {e.strerror or e}"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                raise RunDirectoryError(
                    f"out_dir {str(self.run_dir)!r} is in use by another training run "
                    f"({holder}); wait for it to finish or choose another out_dir"
                ) from None
            try:  # the holder before us removes the file when it ends: make sure we locked the file that is there
                same = os.path.samestat(os.fstat(fd), os.stat(lock))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise RunDirectoryError(f"out_dir {str(self.run_dir)!r}: could not take {LOCK_FILE}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        remove_stale_temporaries(self.run_dir)  # what a killed run left: nobody else can be writing now
        return self

    def release(self) -> None:
        if self._fd is not None:
            (self.run_dir / LOCK_FILE).unlink(missing_ok=True)  # while still held, so nobody locks a stale file
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------------- finding checkpoints
def checkpoint_step(path: Path) -> int | None:
    """The step of a ``checkpoint-NNNNNN`` directory name, or None for any other name."""
    m = _CHECKPOINT_NAME.match(path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The checkpoint directories of a run, oldest first by step number (not by name)."""
    run_dir = Path(run_dir)
    found = [p for p in run_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None] if run_dir.is_dir() else []
    return sorted(found, key=checkpoint_step)


def find_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint directory a run directory's ``latest`` names, a checkpoint directory itself, or None.

    ``latest`` must name a checkpoint of this run (``checkpoint-NNNNNN``, inside the directory): a pointer anywhere
    else is refused, never followed."""
    path = Path(path)
    if (path / TRAINER_JSON).is_file():
        return path
    latest = path / LATEST_FILE
    if latest.is_file():
        try:
            name = latest.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise RunDirectoryError(f"{latest}: cannot be read ({e})") from None
        if not _CHECKPOINT_NAME.match(name):
            raise RunDirectoryError(
                f"{latest} names {name!r}, which is not a checkpoint of this run "
                f"(expected {CHECKPOINT_PREFIX}NNNNNN inside {path})"
            )
        ckpt = path / name
        if not (ckpt / TRAINER_JSON).is_file():
            raise RunDirectoryError(
                f"{latest} names {name}, which is not a complete checkpoint (no {ckpt / TRAINER_JSON})"
            )
        return ckpt
    if latest.exists() or latest.is_symlink():
        raise RunDirectoryError(f"{latest} is not a file (it should hold the name of the newest checkpoint)")
    return None


def model_dir(path: str | Path) -> Path:
    """The directory holding ``config.json`` + weights for a run directory, a checkpoint, or a model directory."""
    if not str(path):
        raise ValueError("the checkpoint path is empty")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = find_checkpoint(path)
    if ckpt is not None:
        return ckpt
    if (path / "config.json").is_file():
        return path
    raise FileNotFoundError(f"{path} holds no training run (no {LATEST_FILE} file) and no config.json")


def load_history(path: str | Path) -> list[dict]:
    """The history saved with a run's latest checkpoint (or a given checkpoint directory)."""
    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"{path} holds no training checkpoint")
    return read_state(ckpt)["history"]


# ---------------------------------------------------------------------- writing
def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data_state: dict,
    history: list[dict],
    train_config: dict,
    moe_layers: list[str],
    keep: int = 1,
) -> Path:
    """Write ``run_dir/checkpoint-{step}`` (see the module docstring), point ``latest`` at it, and remove older
    checkpoints beyond the newest ``keep``. Safetensors + JSON only."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"{CHECKPOINT_PREFIX}{step:06d}"
    final = run_dir / name
    tmp = temp_dir_beside(final)
    try:
        save_pretrained(model, tmp)
        tensors, opt_meta = optimizer_tensors(model, optimizer)
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
        atomic_save_file(tensors, tmp / TRAINER_TENSORS, metadata={"format": FORMAT})
        state = {
            "format": FORMAT,
            "step": step,
            "train_config": train_config,
            "data": data_state,
            "optimizer": opt_meta,
            "moe_layers": moe_layers,
            "history": history,
        }
        atomic_write_text(tmp / TRAINER_JSON, json.dumps(state) + "\n")
        fsync_dir(tmp)
        if final.exists():  # left by an earlier attempt that never became `latest`: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(run_dir)  # the checkpoint's name is on disk before `latest` names it
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(run_dir / LATEST_FILE, name + "\n")
    older = [p for p in list_checkpoints(run_dir) if p.name != name]
    for p in older[: max(len(older) - (keep - 1), 0)]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """AdamW state by parameter name: {"optimizer.<param>.<exp_avg|exp_avg_sq|step>": tensor}, plus JSON metadata."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {}
    for p, st in optimizer.state.items():
        for key, value in st.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {key!r} of {names[id(p)]} is not a tensor")
            tensors[f"optimizer.{names[id(p)]}.{key}"] = value.detach().cpu()
    return tensors, {
        "type": type(optimizer).__name__,
        "param_groups": [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups],
    }


# ---------------------------------------------------------------------- reading
def read_state(ckpt: Path) -> dict:
    """trainer.json of a checkpoint, with every entry the trainer needs present and of the right type."""
    where = ckpt / TRAINER_JSON
    try:
        state = json.loads(where.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirectoryError(f"{where}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirectoryError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(state, dict):
        raise RunDirectoryError(f"{where}: expected a JSON object, got {type(state).__name__}")
    if state.get("format") != FORMAT:
        raise RunDirectoryError(f"{where}: format {state.get('format')!r}, expected {FORMAT!r}")
    for key, kind in _STATE_ENTRIES.items():
        if key not in state:
            raise RunDirectoryError(f"{where}: entry {key!r} is missing")
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise RunDirectoryError(
                f"{where}: entry {key!r} must be a {kind.__name__}, got {type(state[key]).__name__}"
            )
    if state["step"] < 0:
        raise RunDirectoryError(f"{where}: entry 'step' must be >= 0, got {state['step']}")
    groups = state["optimizer"].get("param_groups")
    if not isinstance(groups, list) or not all(isinstance(g, list) for g in groups):
        raise RunDirectoryError(f"{where}: entry 'optimizer.param_groups' must be a list of lists of names")
    return state


def read_checkpoint(ckpt: Path) -> tuple[dict, dict]:
    """(trainer.json state, trainer.safetensors tensors) of a checkpoint, both checked (see ``read_state``)."""
    from safetensors.torch import load_file

    state = read_state(ckpt)
    where = ckpt / TRAINER_TENSORS
    if not where.is_file():
        raise RunDirectoryError(f"{where}: missing")
    try:
        tensors = load_file(str(where))
    except Exception as e:  # safetensors raises its own error types
        raise RunDirectoryError(f"{where}: cannot be read ({e})") from None
    if "rng.torch" not in tensors:
        raise RunDirectoryError(f"{where}: entry 'rng.torch' (the RNG state) is missing")
    return state, tensors


def load_optimizer(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, tensors: dict, meta: dict, where: Path
) -> None:
    """Restore AdamW's state saved by ``optimizer_tensors``; every parameter's entries must be there."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    if meta.get("param_groups") != groups:
        raise RunDirectoryError(f"{where / TRAINER_JSON}: the optimizer's parameter groups do not match this model")
    params = {n: p for n, p in model.named_parameters()}
    sd = optimizer.state_dict()
    state, index = {}, 0
    any_state = any(k.startswith("optimizer.") for k in tensors)
    for g in groups:
        for n in g:
            prefix = f"optimizer.{n}."
            keys = {
                k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix) and "." not in k[len(prefix) :]
            }
            if any_state:
                for entry in ("exp_avg", "exp_avg_sq", "step"):
                    if entry not in keys:
                        raise RunDirectoryError(f"{where / TRAINER_TENSORS}: entry {prefix}{entry} is missing")
                for entry in ("exp_avg", "exp_avg_sq"):
                    if tuple(keys[entry].shape) != tuple(params[n].shape):
                        raise RunDirectoryError(
                            f"{where / TRAINER_TENSORS}: entry {prefix}{entry} has shape "
                            f"{tuple(keys[entry].shape)}, the parameter has "
                            f"{tuple(params[n].shape)}"
                        )
            if keys:
                state[index] = keys
            index += 1
    sd["state"] = state
    optimizer.load_state_dict(sd)
