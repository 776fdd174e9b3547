"""Parameter checkpoints with Orbax.

This is the walking skeleton's part: params of the warm start (cached) and of the final policy.
Full train-state checkpoints with exact resume build on the same helpers.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp


def save_params(path: str | os.PathLike, params) -> Path:
    """Write params under `path` (atomically: Orbax writes a temporary directory, then renames)."""
    path = Path(path).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params, force=True)
    return path


def load_params(path: str | os.PathLike, like):
    """Restore params saved by `save_params`, shaped like `like` (a params pytree of the same model).

    A checkpoint of another model shape fails with one message instead of a partial load.
    """
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at '{path}'")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(path, abstract)
    except (ValueError, KeyError) as e:
        raise ValueError(
            f"checkpoint '{path}' does not match the configured model (different shapes or layers): "
            f"{str(e).splitlines()[0][:300]}. Use the model settings it was trained with."
        ) from None
