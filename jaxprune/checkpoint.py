"""Checkpoints of a workdir: orbax arrays, the architecture JSON, and a checksum manifest.

Layout of ``WORKDIR/checkpoints/<step>/`` (an orbax `CheckpointManager` step):

- ``state/``: the `TrainState` (params, batch_stats, optimizer state, step), `StandardSave`.
- ``meta/``: JSON with the architecture (``arch.to_dict()``), the run's configuration and, after
  pruning, what was pruned; so a checkpoint rebuilds its (possibly narrower) model alone.
- ``jaxprune_sha256.json``: size and SHA-256 of every other file, written after orbax commits;
  a step without it is refused (never read unverified).

Orbax writes a step into a temporary directory and renames it when complete, so an interrupted
save never leaves a step that looks complete, and a step that exists is never overwritten. Before
anything is read or written, the step is checked against its manifest: a changed, truncated or
missing file (the manifest included) refuses the checkpoint with one line naming it, and nothing
in the workdir changes. There is no fall-back to an older step unless the caller asks for that step.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"
REJECTED_DIR = "rejected_checkpoints"
MANIFEST = "jaxprune_sha256.json"
FORMAT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is one line naming it."""


def checkpoint_root(workdir: str | os.PathLike) -> Path:
    return Path(workdir).absolute() / CHECKPOINT_DIR


def steps(workdir: str | os.PathLike) -> list[int]:
    """Committed checkpoint steps in ``workdir``, ascending (orbax's temporary dirs excluded)."""
    root = checkpoint_root(workdir)
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def latest_step(workdir: str | os.PathLike) -> int | None:
    found = steps(workdir)
    return found[-1] if found else None


def step_path(workdir: str | os.PathLike, step: int) -> Path:
    return checkpoint_root(workdir) / str(step)


def _file_digests(step_dir: Path) -> dict[str, list]:
    """Relative path -> [size in bytes, sha256 hex] of every file of a step except the manifest."""
    out = {}
    for path in sorted(step_dir.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            digest = hashlib.sha256()
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            out[str(path.relative_to(step_dir))] = [path.stat().st_size, digest.hexdigest()]
    return out


def _write_manifest(step_dir: Path) -> None:
    tmp = step_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(_file_digests(step_dir), indent=1))
    os.replace(tmp, step_dir / MANIFEST)  # Atomic: a manifest is complete or absent.


def verify(workdir: str | os.PathLike, step: int) -> None:
    """Checks a step against its manifest; reads only.

    A step without its manifest is refused like a corrupt one: it is never loaded unverified. (A
    save killed in the instant between orbax's commit and the manifest leaves one; so does a
    deleted manifest. The run resumes from an earlier step chosen with ``--restore-step``.)

    Raises:
      CheckpointError: one line naming the checkpoint and the first bad file.
    """
    step_dir = step_path(workdir, step)
    if not step_dir.is_dir():
        raise CheckpointError(f"no checkpoint at step {step} in {checkpoint_root(workdir)}")
    manifest_path = step_dir / MANIFEST
    if not manifest_path.exists():
        raise CheckpointError(
            f"corrupt checkpoint {step_dir}: its checksum manifest {MANIFEST} is missing (a save "
            "that did not finish, or a deleted file); it is not loaded unverified"
        )
    try:
        expected = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"corrupt checkpoint {step_dir}: unreadable {MANIFEST} ({e})"
        ) from None
    for name, (size, _) in expected.items():
        path = step_dir / name
        if not path.is_file():
            raise CheckpointError(f"corrupt checkpoint {step_dir}: file {name} is missing")
        if path.stat().st_size != size:
            raise CheckpointError(
                f"corrupt checkpoint {step_dir}: file {name} has {path.stat().st_size} bytes, "
                f"{size} were written"
            )
    actual = _file_digests(step_dir)
    for name, (_, sha256) in expected.items():
        if actual[name][1] != sha256:
            raise CheckpointError(f"corrupt checkpoint {step_dir}: file {name} changed (checksum)")


def has_manifest(workdir: str | os.PathLike, step: int) -> bool:
    """Whether a step's manifest was written (the last act of a save)."""
    return (step_path(workdir, step) / MANIFEST).is_file()


def verifies(workdir: str | os.PathLike, step: int) -> bool:
    """Whether a step passes `verify`."""
    try:
        verify(workdir, step)
    except CheckpointError:
        return False
    return True


def _manager(
    workdir: str | os.PathLike, max_to_keep: int | None, create: bool
) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=create,
        # Synchronous: the manifest is computed from the committed files.
        enable_async_checkpointing=False,
    )
    return ocp.CheckpointManager(checkpoint_root(workdir), options=options)


def read_meta(workdir: str | os.PathLike, step: int) -> dict:
    """The JSON metadata of a verified step: ``arch``, ``config``, ``phase``, ``pruning``..."""
    verify(workdir, step)
    path = step_path(workdir, step)
    try:
        with _manager(workdir, None, create=False) as manager:
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
                "meta"
            ]
    except Exception as e:  # noqa: BLE001 - any failure to read means the checkpoint is unusable.
        raise CheckpointError(f"unreadable checkpoint {path}: {_one_line(e)}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} was not written by this version of jaxprune")
    return meta


def restore(workdir: str | os.PathLike, step: int, target: Any) -> Any:
    """The arrays of a verified step, restored into ``target``'s shapes and shardings.

    Args:
      workdir: the run's directory.
      step: which step.
      target: pytree of `jax.ShapeDtypeStruct` with shardings, e.g.
        `jaxprune.train.abstract_train_state` of the architecture in `read_meta`.

    Raises:
      CheckpointError: if the files are corrupt or do not match ``target``.
    """
    verify(workdir, step)
    path = step_path(workdir, step)
    try:
        with _manager(workdir, None, create=False) as manager:
            args = ocp.args.Composite(state=ocp.args.StandardRestore(target))
            return manager.restore(step, args=args)["state"]
    except Exception as e:  # noqa: BLE001 - any failure to read means the checkpoint is unusable.
        raise CheckpointError(f"unreadable checkpoint {path}: {_one_line(e)}") from None


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}"


class Writer:
    """Saves steps of one workdir (one orbax manager for the run); use as a context manager."""

    def __init__(self, workdir: str | os.PathLike, max_to_keep: int | None = 3):
        self._manager = _manager(workdir, max_to_keep, create=True)

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Writes ``state`` and ``meta`` as ``step`` and commits it; refuses an existing step."""
        meta = {"format": FORMAT_VERSION, **meta, "step": int(step)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        if not self._manager.save(step, args=args, force=True):
            raise RuntimeError(f"orbax did not save step {step}")
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            _write_manifest(Path(self._manager.directory) / str(step))

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def reject_after(workdir: str | os.PathLike, step: int) -> list[int]:
    """Moves the steps after ``step`` into ``WORKDIR/rejected_checkpoints/`` (never deletes).

    For resuming from an explicitly chosen older step: later steps would otherwise clash with the
    steps the resumed run writes.
    """
    later = [s for s in steps(workdir) if s > step]
    if later and jax.process_index() == 0:
        rejected = Path(workdir) / REJECTED_DIR
        rejected.mkdir(exist_ok=True)
        for s in later:
            target = rejected / str(s)
            suffix = 1
            while target.exists():
                target = rejected / f"{s}.{suffix}"
                suffix += 1
            shutil.move(step_path(workdir, s), target)
    return later
