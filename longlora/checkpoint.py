"""Training checkpoints that a kill, a full disk or a bad copy cannot turn into an error on every rerun.

`save_checkpoint` writes atomically (a temporary file renamed over the old one), so a kill mid-write leaves the
previous checkpoint whole. `load_checkpoint` treats a file it cannot read (truncated, corrupt, not a checkpoint)
as no checkpoint: it logs a warning naming the file, moves it aside to `<name>.corrupt` (nothing is deleted; the
warning says what to delete) and the run starts over instead of raising `UnpicklingError` every time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

def corrupt_path(path: str | Path) -> Path:
    """Where `load_checkpoint` moves an unreadable checkpoint: `<name>.corrupt`, or `<name>.corrupt-2`, … when
    an earlier one is still there (it is never overwritten)."""
    path = Path(path)
    aside = path.with_name(path.name + ".corrupt")
    number = 1
    while aside.exists() or aside.is_symlink():
        number += 1
        aside = path.with_name(f"{path.name}.corrupt-{number}")
    return aside


def save_checkpoint(path: str | Path, state: dict) -> None:
    """torch.save `state` to `path` atomically."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, required: Iterable[str] = ()) -> dict | None:
    """The state dict saved at `path`; None when there is none, or when it is unreadable or lacks a `required`
    key (then it is moved aside to `<name>.corrupt` with a warning, and the caller starts over)."""
    import torch

    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except OSError:
        raise  # cannot open it (permissions, I/O): not the file's fault, leave it where it is
    except Exception as err:  # damaged bytes make the unpickler fail in any number of ways (IndexError, …)
        problem = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else 'unreadable'}"
    else:
        missing = [key for key in required if not isinstance(state, dict) or key not in state]
        if isinstance(state, dict) and not missing:
            return state
        problem = f"not a checkpoint of this run (missing {', '.join(missing) or 'everything'})"
    aside = corrupt_path(path)
    os.replace(path, aside)
    log.warning("checkpoint %s is unreadable (%s): moved it to %s and starting over; delete that file once you no "
                "longer need it", path, problem, aside)
    return None
