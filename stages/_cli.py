"""The shared command line of every stage: `python -m stages.<name> [--params params.yaml]`."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from longlora.errors import InputError
from stages.params import DEFAULT_PARAMS_FILE, Params, load_params


class Terminated(KeyboardInterrupt):
    """SIGTERM, what `timeout`, SLURM, Docker and Prefect's cancellation send: unwound as Ctrl-C is, so that the
    stage's temporary folders and lock go with it."""


def _terminate(signum, frame) -> None:
    raise Terminated


def main(stage: str, run: Callable[[Params], dict], argv: list[str] | None = None) -> int:
    """Validate the whole params file, run the stage, print its metrics; bad input exits 2 with one clear line,
    SIGTERM exits 143 having removed what the run had started to write."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=run.__doc__)
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS_FILE, help="parameters file (params.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {stage} %(levelname)s %(message)s")
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        params = load_params(args.params)
        params.check_base_context(str(args.params))
        metrics = run(params)
    except (InputError, FileNotFoundError) as err:
        _close_progress_bars()
        print(f"stages.{stage}: error: {err}", file=sys.stderr)
        return 2
    except Terminated:
        _close_progress_bars()
        print(f"stages.{stage}: terminated (SIGTERM): nothing was published", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


def _close_progress_bars() -> None:
    """A bar left open by the error (the Trainer's, at a diverged step) would put the message at the end of its line."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def exit_process(code: int) -> NoReturn:
    """End a stage's own process (`python -m stages.<name>`) with `code`. The objects torch and transformers leave
    behind are frozen first, so that the interpreter's shutdown does not walk them all in its final garbage
    collections, most of a stage process's exit (docs/performance.md). Only for the process's end: frozen objects are
    never collected, which would leak in a process that goes on (the tests)."""
    gc.freeze()
    raise SystemExit(code)
