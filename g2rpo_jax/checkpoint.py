"""Checkpoints with Orbax: parameter snapshots and full train-state checkpoints for exact resume.

`save_params` / `load_params`: one params pytree (the warm-start cache, `final/params`, the run's
reference policy).

`TrainCheckpointer`: an Orbax `CheckpointManager` under `<train.output_dir>/checkpoints/`. Each step
directory `checkpoints/<step>/` holds four items:

- `params`: the policy parameters (restorable alone, e.g. by `g2rpo evaluate`);
- `state`: the rest of the train state except the reference parameters: step, optimizer state,
  guidance-controller state, RNG key;
- `iterator`: the prompt iterator's position (JSON, saved state, not replayed by counting);
- `meta`: the resolved config and the resolved model config (JSON).

The reference parameters never change during a run, so they are written once, at the start, to
`checkpoints/reference/` (not a step directory, so the manager never deletes it) and restored from
there; a run with `loss.beta = 0` has none. Saves are asynchronous; Orbax writes each one to a temporary directory and renames it when
complete, so a process killed at any moment leaves the previous checkpoints usable.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger("g2rpo_jax")

REFERENCE_DIR = "reference"


class _QuietItemMetadata(logging.Filter):
    """Orbax warns that an item directory (checkpoints/<step>/params) lacks the step-level metadata
    file when it is read on its own, as `g2rpo evaluate` does; that is expected here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Metadata file does not exist" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietItemMetadata())
ITEMS = ("params", "state", "iterator", "meta")


def save_params(path: str | os.PathLike, params) -> Path:
    """Write params under `path` (atomically: Orbax writes a temporary directory, then renames)."""
    path = Path(path).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params, force=True)
    return path


class CheckpointMismatch(ValueError):
    """A readable checkpoint written by a different model or config: an error, never a fallback."""


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _shapes(tree) -> dict[str, tuple]:
    """'path/to/leaf' -> shape, for comparing a checkpoint's tree with the configured model's."""
    out = {}
    for keypath, leaf in jax.tree_util.tree_leaves_with_path(tree):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keypath)
        out[name] = tuple(getattr(leaf, "shape", ()))
    return out


def check_shapes(path, saved_tree, like, what: str = "checkpoint") -> None:
    """Raise one clear CheckpointMismatch when `saved_tree` (arrays or Orbax metadata) does not have the
    leaves and shapes of `like`; the first difference is named."""
    saved, wanted = _shapes(saved_tree), _shapes(like)
    if saved == wanted:
        return
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    if missing or extra:
        detail = (f"it lacks {missing[0]}" if missing else f"it has an extra {extra[0]}") + \
                 f" ({len(missing)} missing, {len(extra)} extra leaves)"
    else:
        name = next(k for k in wanted if saved[k] != wanted[k])
        detail = f"{name} has shape {saved[name]} there but {wanted[name]} in the configured model"
    raise CheckpointMismatch(f"{what} '{path}' does not match the configured model: {detail}. "
                     "Use the model settings it was trained with.")


def load_params(path: str | os.PathLike, like):
    """Restore params saved by `save_params`, shaped like `like` (a params pytree of the same model).

    A checkpoint of another model shape fails with one message instead of a partial load.
    """
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at '{path}'")
    with ocp.StandardCheckpointer() as ckptr:
        try:
            meta = ckptr.metadata(path)
            meta = getattr(meta, "item_metadata", meta)
        except Exception:  # unreadable metadata: let restore report the problem
            meta = None
        if meta is not None:
            check_shapes(path, meta, like)
        try:
            return ckptr.restore(path, _abstract(like))
        except (ValueError, KeyError) as e:
            raise ValueError(
                f"checkpoint '{path}' does not match the configured model (different shapes or layers): "
                f"{str(e).splitlines()[0][:300]}. Use the model settings it was trained with."
            ) from None


def _model_mismatch(saved: dict, current: dict) -> Optional[str]:
    diffs = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if not diffs:
        return None
    return ", ".join(f"model.{k}={saved.get(k)!r} there but {current.get(k)!r} here" for k in diffs[:3])


class TrainCheckpointer:
    """Train-state checkpoints of one run under `<output_dir>/checkpoints/`."""

    def __init__(self, output_dir: str | os.PathLike, max_to_keep: int = 2, async_save: bool = True):
        self.directory = Path(output_dir).expanduser().absolute() / "checkpoints"
        self.reference_path = self.directory / REFERENCE_DIR
        self.directory.mkdir(parents=True, exist_ok=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep if max_to_keep and max_to_keep > 0 else None,
            enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True)
        handlers = {"params": ocp.StandardCheckpointHandler(), "state": ocp.StandardCheckpointHandler(),
                    "iterator": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    # -- writing ---------------------------------------------------------------------------
    def save_reference(self, params) -> Path:
        return save_params(self.reference_path, params)

    def save(self, step: int, params, state: dict, iterator_state: dict, meta: dict, wait: bool = False) -> Path:
        """Start an (asynchronous) save of step `step`; `wait=True` blocks until it is on disk."""
        self.manager.wait_until_finished()  # at most one save in flight; a retry of a step overwrites
        if step in self.manager.all_steps():
            self.manager.delete(step)
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), state=ocp.args.StandardSave(state),
            iterator=ocp.args.JsonSave(iterator_state), meta=ocp.args.JsonSave(meta)), force=True)
        if wait:
            self.manager.wait_until_finished()
        return self.step_path(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    # -- reading ---------------------------------------------------------------------------
    def step_path(self, step: int) -> Path:
        return self.directory / str(step)

    def steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def restore_latest(self, params_like, state_like: dict, model_config: dict, with_reference: bool = True):
        """Newest usable checkpoint: (step, params, state, iterator_state, meta, reference params or
        None without ``with_reference``), or None when there is none. An unreadable (incomplete or corrupted) newest checkpoint is skipped
        with a warning naming it; a readable one from another model raises CheckpointMismatch."""
        steps = self.steps()
        if not steps:
            return None
        errors = []
        for step in reversed(steps):
            path = self.step_path(step)
            try:
                meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
            except Exception as e:  # noqa: BLE001 - any read failure means an unusable checkpoint
                errors.append(self._skip(path, e))
                continue
            why = _model_mismatch(meta.get("model", {}), model_config)
            if why:
                raise CheckpointMismatch(f"checkpoint '{path}' was written by a different model ({why}); "
                                         "resume with the model settings it was trained with, or use a new "
                                         "train.output_dir")
            try:
                item_meta = self.manager.item_metadata(step)
                check_shapes(path / "params", item_meta["params"], params_like, "checkpoint")
                check_shapes(path / "state", item_meta["state"], state_like, "checkpoint")
                out = self.manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(_abstract(params_like)),
                    state=ocp.args.StandardRestore(_abstract(state_like)),
                    iterator=ocp.args.JsonRestore()))
                params, state, iterator = out.params, out.state, out.iterator
                check_shapes(path / "params", params, params_like, "checkpoint")
            except CheckpointMismatch:
                raise
            except Exception as e:  # noqa: BLE001 - any read failure means an unusable checkpoint
                errors.append(self._skip(path, e))
                continue
            reference = self.load_reference(params_like) if with_reference else None
            self._set_aside([self.step_path(s) for s in steps if s > step])
            return step, params, state, iterator, meta, reference
        raise ValueError(f"no usable checkpoint in '{self.directory}': {len(errors)} found, all unreadable "
                         f"(newest: {errors[0]}); remove the directory to start over")

    def _set_aside(self, paths: list[Path]) -> None:
        """Rename unusable newer step directories to `<step>.unusable` (kept for inspection, no longer a
        step), so the resumed run can save those steps again."""
        for path in paths:
            target = path.with_name(path.name + ".unusable")
            n = 1
            while target.exists():
                target, n = path.with_name(f"{path.name}.unusable{n}"), n + 1
            path.rename(target)
            log.warning("moved the unusable checkpoint %s to %s", path, target)
        if paths:
            self.manager.reload()

    def load_reference(self, params_like):
        if not self.reference_path.exists():
            raise ValueError(f"the run's reference parameters '{self.reference_path}' are missing; "
                             "they are written at the start of a run with loss.beta > 0 and needed to resume "
                             "it (a run started with loss.beta=0 has none: resume it with loss.beta=0)")
        try:
            return load_params(self.reference_path, params_like)
        except ValueError as e:
            raise ValueError(f"the run's reference parameters are unreadable: {e}") from None

    @staticmethod
    def _skip(path: Path, error: Exception) -> str:
        msg = f"{path}: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        log.warning("checkpoint %s is incomplete or corrupted (%s); falling back to the previous one", path,
                    msg.split(": ", 1)[1])
        return msg


def remove_checkpoints(output_dir: str | os.PathLike) -> int:
    """Delete `<output_dir>/checkpoints/` (a fresh run into an old directory); returns how many step
    checkpoints were there."""
    directory = Path(output_dir).expanduser().absolute() / "checkpoints"
    if not directory.exists():
        return 0
    n = sum(1 for p in directory.iterdir() if p.name.isdigit())
    shutil.rmtree(directory)
    return n


def step_dirs(checkpoints_dir: str | os.PathLike) -> list[Path]:
    """Complete step directories under a `checkpoints/` directory, newest first (Orbax's temporary
    directories of unfinished saves are not named by a bare step number)."""
    directory = Path(checkpoints_dir)
    if not directory.is_dir():
        return []
    steps = sorted((int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)
    return [directory / str(s) for s in steps]


def read_meta(step_dir: str | os.PathLike) -> dict:
    """The `meta` item (resolved config, model config, step) of one step checkpoint."""
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
        return ckptr.restore(Path(step_dir).absolute() / "meta")


def load_step_params(step_dir: str | os.PathLike, like):
    """The policy params of one step checkpoint (`checkpoints/<step>`), shaped like `like`."""
    return load_params(Path(step_dir) / "params", like)


def load_newest_params(checkpoints_dir: str | os.PathLike, like) -> tuple[Path, Any]:
    """(step dir, params) of the newest readable step checkpoint; unreadable ones are skipped with a
    warning, one of another model shape raises ValueError."""
    errors = []
    for path in step_dirs(checkpoints_dir):
        try:
            return path, load_step_params(path, like)  # checks shapes from the metadata first
        except CheckpointMismatch:
            raise
        except Exception as e:  # noqa: BLE001 - any read failure means an unusable checkpoint
            errors.append(TrainCheckpointer._skip(path, e))
    if errors:
        raise ValueError(f"no usable checkpoint in '{checkpoints_dir}': newest: {errors[0]}")
    raise FileNotFoundError(f"no checkpoint in '{checkpoints_dir}'")


def to_numpy(tree: Any):
    return jax.tree.map(np.asarray, tree)
