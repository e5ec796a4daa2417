"""Stage outputs that never lose a user's data, and atomic files.

A stage publishes its output folder atomically (a temporary folder beside it, renamed at the end: a failed or killed
run never leaves anything that looks finished) and only ever replaces what it wrote itself. Every published folder
carries a marker, `.longlora-output.json`, naming the stage and listing the files it wrote. An existing folder is
replaced only when it is empty or carries that stage's marker and holds nothing but the files listed there; a folder
with any other file, an existing file, the working directory or a folder above it, the home folder, a mount point
and a symbolic link are refused, before any work, with an `OutputError` naming the parameter and the path. A metrics
file is replaced only when it is one this stage wrote (a JSON object whose `"stage"` names it).

`StageOutput` holds a lock (`.<name>.lock` beside the folder, removed at the end) from the check to the end of the
run, so a second run of the same stage on the same output fails at once; under the lock it removes the temporary
folders a killed run left behind (`.<name>.tmp-*`, recognised by their marker).

Outputs and metrics are reproducible: the same inputs and parameters give the same bytes, so DVC sees an unchanged
stage. A metrics file holds results only, so that `dvc metrics show` and `dvc exp show` list results, not settings.
What a run measures that depends on the machine and the moment (wall-clock seconds, throughput, peak memory, a resume
point, the training curves' dvclive logs with their speeds and run times) goes to the stage's run log instead,
`data/logs/<stage>/` (`StageOutput.log_dir`; `timings.json` there), which no stage reads and DVC does not track, with
the parameters the stage ran with (`params.json`: its section as it took effect, derived defaults resolved).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from longlora.errors import InputError, NonFiniteError, non_finite_paths

log = logging.getLogger(__name__)

OUTPUT_MARKER = ".longlora-output.json"
_SHOWN_ENTRIES = 5
RUN_LOGS = Path("data/logs")
"""Each stage's run log, `<RUN_LOGS>/<stage>/` (relative to the project): not a DVC output, never read by a stage."""
TIMINGS_FILE = "timings.json"
PARAMS_FILE = "params.json"


def run_log(stage: str) -> Path:
    """The run log folder of `stage` (an instance: `eval_passkey@base`)."""
    return RUN_LOGS / stage


class OutputError(InputError):
    """An output path the stage must not write: it would replace or delete something the stage did not write."""


class OutputBusyError(OutputError):
    """Another run of the same stage holds the output's lock."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(path: Path, mode: int) -> None:
    """mkdtemp/mkstemp create owner-only (0700/0600) entries; give the final output the usual permissions."""
    os.chmod(path, mode & ~_umask())


def _umask_owner_only(folder: Path) -> None:
    """Libraries that write through mkstemp (transformers' safetensors files) leave owner-only (0600) files: give
    those the permissions the process's umask gives any other file."""
    for path in folder.rglob("*"):
        if path.is_symlink():
            continue
        mode = path.stat().st_mode & 0o777
        if mode & 0o077 == 0:
            _publish(path, 0o777 if path.is_dir() else 0o666 | (mode & 0o111))


def resolved(path: str | Path) -> Path:
    """`path` with `~` expanded, made absolute and with symbolic links resolved (it need not exist)."""
    return Path(path).expanduser().resolve()


def same_path(a: str | Path, b: str | Path) -> bool:
    """Whether two spellings name the same place (relative or absolute, `~`, `..`, symbolic links)."""
    return resolved(a) == resolved(b)


def path_relation(a: Path, b: Path) -> str | None:
    """How resolved path `a` overlaps resolved path `b`, as words, or None if they are apart."""
    if a == b:
        return "is the same place as"
    if b in a.parents:
        return "is inside"
    if a in b.parents:
        return "contains"
    return None


def protected_place(path: str | Path) -> str | None:
    """Why no stage may ever write or replace `path` (whatever it holds), or None.

    The working directory (the project), any folder above it, the home folder and the folders above it, and the
    filesystem root: replacing one of them would take everything under it.
    """
    place = resolved(path)
    cwd = Path.cwd().resolve()
    if place == cwd:
        return "is the working directory"
    if place in cwd.parents:
        return "is a folder above the working directory"
    home = Path.home().resolve()
    if place == home or place in home.parents:
        return "is the home folder or a folder above it"
    if place == Path(place.anchor):
        return "is the filesystem root"
    return None


def _raise(err: OSError) -> None:
    raise err


def _entries(folder: Path) -> set[str]:
    """Every file and symbolic link under `folder` (not following links), as relative POSIX paths. A folder that
    cannot be listed raises: it must not pass for an empty one."""
    found = set()
    for root, dirs, files in os.walk(folder, onerror=_raise):
        base = Path(root).relative_to(folder)
        found.update((base / name).as_posix() for name in files)
        found.update((base / name).as_posix() for name in dirs if os.path.islink(os.path.join(root, name)))
    return found


def _read_marker(folder: Path) -> dict | None:
    try:
        marker = json.loads((folder / OUTPUT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _shown(names) -> str:
    names = sorted(names)
    more = f", … ({len(names)} in all)" if len(names) > _SHOWN_ENTRIES else ""
    return ", ".join(names[:_SHOWN_ENTRIES]) + more


def _first_existing_ancestor_not_a_folder(path: Path) -> Path | None:
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            return None if parent.is_dir() else parent
    return None


class StageOutput:
    """One stage's output folder (and metrics file): checked and locked before any work, published atomically.

        with StageOutput("prepare_eval", "data/eval", "prepare_eval.out_dir", "data/metrics/eval.json",
                         "prepare_eval.metrics_file") as out:
            ...                                   # the work; nothing has been written yet
            with out.publish() as tmp:            # a fresh folder; it replaces data/eval if the block succeeds
                ...
            metrics = out.write_metrics(metrics, timings={"tokens_per_second": speed})
            # metrics: deterministic, with "stage" (the metrics file's own marker) added; the run log gets
            # data/logs/prepare_eval/params.json (the stage's parameters) and timings.json (`timings` with "seconds"
            # since the claim added)
    """

    def __init__(self, owner: str, path: str | Path, param: str, metrics_file: str | Path | None = None,
                 metrics_param: str = "metrics_file", params: dict | None = None):
        self.owner = owner
        self.params = params
        """The stage's effective parameters (derived defaults filled in), written to its run log's params.json."""
        self.path = Path(path).expanduser()
        self.param = param
        self.metrics_file = Path(metrics_file).expanduser() if metrics_file is not None else None
        self.metrics_param = metrics_param
        self._lock: int | None = None
        self._started: float | None = None
        self._published = False

    @property
    def log_dir(self) -> Path:
        """The stage's run log folder: timings and logs that differ from run to run, kept out of its outputs."""
        return run_log(self.owner)

    # --- checks -------------------------------------------------------------------------------------------------

    def _refuse(self, param: str, path: Path, reason: str) -> OutputError:
        return OutputError(f"{param} {str(path)!r} {reason}; nothing was written or deleted")

    def check(self) -> None:
        """Raise OutputError unless the folder and the metrics file may be (re)written by this stage."""
        self._check_folder()
        if self.metrics_file is not None:
            self._check_metrics_file()

    def _check_place(self, param: str, path: Path) -> None:
        reason = protected_place(path)
        if reason is None and path.is_symlink():
            reason = "is a symbolic link (name the real place instead)"
        if reason is None and path.exists() and os.path.ismount(path):
            reason = "is a mount point"
        if reason is None and (blocker := _first_existing_ancestor_not_a_folder(path)) is not None:
            reason = f"cannot be created: {str(blocker)!r} is a file, not a folder"
        if reason is not None:
            raise self._refuse(param, path, reason)

    def _check_folder(self) -> None:
        path = self.path
        self._check_place(self.param, path)
        if not path.exists():
            return
        if not path.is_dir():
            raise self._refuse(self.param, path, f"is an existing file, not an output folder of stage {self.owner}")
        try:
            entries = _entries(path)
        except OSError as err:
            raise self._refuse(self.param, path, f"cannot be read to check what it holds ({err.strerror})") from None
        if not entries:
            return
        marker = _read_marker(path)
        if marker is None:
            raise self._refuse(self.param, path, f"holds files that stage {self.owner} did not write "
                               f"({_shown(entries)}; no {OUTPUT_MARKER}); name another folder, or move them away")
        if marker.get("stage") != self.owner:
            raise self._refuse(self.param, path, f"is the output of stage {marker.get('stage')!r}, not of "
                               f"{self.owner}; name another folder")
        listed = marker.get("files")
        listed = {name for name in listed if isinstance(name, str)} if isinstance(listed, list) else set()
        foreign = entries - {OUTPUT_MARKER} - listed
        if foreign:
            raise self._refuse(self.param, path, f"holds files that stage {self.owner} did not write "
                               f"({_shown(foreign)}); move them away first")

    def _check_metrics_file(self) -> None:
        path = self.metrics_file
        assert path is not None
        self._check_place(self.metrics_param, path)
        if not path.exists():
            return
        if path.is_dir():
            raise self._refuse(self.metrics_param, path, "is a folder, not a metrics file")
        try:
            written = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            written = None
        if not isinstance(written, dict) or written.get("stage") != self.owner:
            raise self._refuse(self.metrics_param, path, f"exists and is not a metrics file of stage {self.owner} "
                               f"(a JSON object whose \"stage\" is {self.owner!r}); name another file, or delete "
                               "it yourself if it is an old metrics file")

    # --- the claim: lock, leftovers -------------------------------------------------------------------------------

    @property
    def lock_file(self) -> Path:
        return self.path.with_name(f".{self.path.name}.lock")

    def _tmp_prefix(self) -> str:
        return f".{self.path.name}.tmp-"

    def __enter__(self) -> StageOutput:
        self.check()  # before creating anything, even the lock file
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = self._acquire()
        try:
            self._remove_leftovers()
            self.check()  # again: the folder may have changed while another run held the lock
        except BaseException:
            self._release()
            raise
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._release()

    def _acquire(self) -> int:
        while True:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputBusyError(
                    f"{self.param} {str(self.path)!r}: another run of stage {self.owner} is writing it "
                    f"(it holds {self.lock_file}); wait for it to finish"
                ) from None
            opened = os.fstat(fd)
            if opened.st_size:
                os.close(fd)
                raise self._refuse(self.param, self.path, f"cannot be locked: {str(self.lock_file)!r} is not an "
                                   "empty lock file (a file of yours?); move it away")
            try:
                on_disk = os.stat(self.lock_file)
            except FileNotFoundError:
                on_disk = None
            # A run finishing meanwhile unlinks the file it locked: then lock the one now on disk.
            if on_disk is not None and (on_disk.st_dev, on_disk.st_ino) == (opened.st_dev, opened.st_ino):
                return fd
            os.close(fd)

    def _release(self) -> None:
        if self._lock is not None:
            # Unlinked while still locked, so no run can lock this file after it is gone (see _acquire).
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.lock_file)
            os.close(self._lock)
            self._lock = None

    def _remove_leftovers(self) -> None:
        """Temporary folders of a killed run of this stage: ours only if empty or marked by this stage."""
        if not self.path.parent.is_dir():
            return
        for entry in self.path.parent.iterdir():
            if not entry.name.startswith(self._tmp_prefix()) or entry.is_symlink() or not entry.is_dir():
                continue
            marker = _read_marker(entry)
            if marker is not None and marker.get("stage") == self.owner:
                shutil.rmtree(entry, ignore_errors=True)
                continue
            try:
                entry.rmdir()  # killed between creating it and marking it: empty
            except OSError:
                log.warning("left %s alone: it looks like a temporary folder of stage %s but carries no %s (a "
                            "leftover of an older version?); delete it yourself if you do not need it",
                            entry, self.owner, OUTPUT_MARKER)

    # --- writing ----------------------------------------------------------------------------------------------------

    def _new_tmp(self, kind: str) -> Path:
        if self._lock is None:
            raise RuntimeError("use StageOutput as a context manager: the output is claimed in __enter__")
        tmp = Path(tempfile.mkdtemp(prefix=f"{self._tmp_prefix()}{kind}", dir=self.path.parent))
        write_json(tmp / OUTPUT_MARKER, {"stage": self.owner, "files": None})
        return tmp

    @contextlib.contextmanager
    def publish(self) -> Iterator[Path]:
        """Yield a fresh folder beside the output; if the block succeeds it replaces the output, else it goes."""
        tmp = self._new_tmp("")
        try:
            yield tmp
            files = sorted(_entries(tmp) - {OUTPUT_MARKER})
            write_json(tmp / OUTPUT_MARKER, {"stage": self.owner, "files": files})
            _umask_owner_only(tmp)
            _publish(tmp, 0o777)
            self._check_folder()  # it may have changed during the run
            if self.path.exists():
                # Move the old output aside first so there is no moment with neither a complete old nor new folder.
                old = self.path.with_name(f"{self._tmp_prefix()}old-{os.getpid()}")
                self.path.rename(old)
                tmp.rename(self.path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(self.path)
            self._published = True
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @contextlib.contextmanager
    def scratch(self) -> Iterator[Path]:
        """A temporary folder beside the output for intermediate files, removed at the end (or by the next run)."""
        tmp = self._new_tmp("scratch-")
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def write_metrics(self, metrics: dict, timings: dict | None = None) -> dict:
        """Write the metrics file (with `"stage"`, its marker) atomically, and the run log's parameters (when given)
        and timings (`timings` and the seconds since the output was claimed); return what the metrics file holds.

        `metrics` must be the same for the same inputs and parameters (DVC hashes the file): anything measured on
        the clock or the machine belongs in `timings`.
        """
        if self.metrics_file is None:
            raise ValueError(f"stage {self.owner}: no metrics file was named")
        if self._lock is None or self._started is None:
            raise RuntimeError("use StageOutput as a context manager: the output is claimed in __enter__")
        self._check_metrics_file()
        bad = non_finite_paths(metrics)
        if bad:
            shown = ", ".join(bad[:5]) + (f", … ({len(bad)} in all)" if len(bad) > 5 else "")
            if self._published:  # results that come with NaN metrics are not results: no stage may read them
                if self.path.is_dir():
                    shutil.rmtree(self.path, ignore_errors=True)
                else:
                    self.path.unlink(missing_ok=True)
            raise NonFiniteError(f"stage {self.owner}: non-finite metrics ({shown}): neither they nor "
                                 f"{str(self.path)!r} were kept; a NaN means the model or its run diverged")
        written = {"stage": self.owner, **metrics}
        write_json(self.metrics_file, written)
        if self.params is not None:
            write_json(self.log_dir / PARAMS_FILE, {"stage": self.owner, "params": self.params})
        seconds = round(time.perf_counter() - self._started, 2)
        write_json(self.log_dir / TIMINGS_FILE, {"stage": self.owner, **(timings or {}), "seconds": seconds})
        log.info("stage %s took %.1f s (timings: %s)", self.owner, seconds, self.log_dir / TIMINGS_FILE)
        return written


@contextlib.contextmanager
def atomic_dir(final: str | Path, owner: str, param: str = "out_dir") -> Iterator[Path]:
    """Claim `final` for `owner` and publish it: `with atomic_dir("data/x", "my_stage") as tmp: ...`."""
    with StageOutput(owner, final, param) as out, out.publish() as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_file(final: str | Path, mode: str = "w") -> Iterator:
    """Open a temporary file beside `final` for writing; it replaces `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
        _publish(Path(tmp), 0o666)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, data: object) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_file(path) as handle:
        json.dump(data, handle, indent=2, sort_keys=True, allow_nan=False)  # NaN is not JSON: fail, never write it
        handle.write("\n")


def file_digests(folder: str | Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path (files read in 1 MiB pieces: weights can be large)."""
    folder = Path(folder)
    digests = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                digests[path.relative_to(folder).as_posix()] = hashlib.file_digest(handle, "sha256").hexdigest()
    return digests


def content_digest(source: str | Path) -> str:
    """What identifies a model or data source by content: the sha256 of a local folder's files (names and bytes), of
    a local file, or for anything else (a hub id) the name itself."""
    path = Path(source).expanduser()
    if path.is_dir():
        return hashlib.sha256(json.dumps(file_digests(path), sort_keys=True).encode()).hexdigest()
    if path.is_file():
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    return str(source)
