"""Run-directory paths: local or cloud (gs://, s3://), one way through etils.epath.

A pod job names one run directory for every host, usually in a bucket. Every file the run writes
(checkpoints, metrics, TensorBoard, final metrics, evaluation tables) is reached from
`run_path(config.resolved_run_dir)`, so a `gs://` directory stays a bucket path everywhere:
turning it into a local path (os.path.abspath) would give each host its own private copy.
"""
from __future__ import annotations

import json
import os

from etils import epath


def is_local(path: str | os.PathLike) -> bool:
    """True for a plain filesystem path; False for a URI (gs://bucket/..., s3://...)."""
    return "://" not in os.fspath(path)


def run_path(path: str | os.PathLike) -> epath.Path:
    """An epath.Path for `path`: local paths made absolute (orbax wants them so, and the run's
    messages then name a directory that means the same thing on every host), URIs unchanged."""
    if is_local(path):
        return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    return epath.Path(os.fspath(path))


def write_json(path: epath.Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


class JsonLines:
    """An append-only JSON-lines file. Object stores cannot append: there the whole file is
    rewritten on every write (metrics files are small), after reading what a resumed run's
    earlier attempts left, so no earlier line is lost."""

    def __init__(self, path: epath.Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.local = is_local(path)
        if self.local:
            self._file = open(os.fspath(path), "a")
        else:
            self._lines = path.read_text().splitlines(keepends=True) if path.exists() else []

    def write(self, obj: dict) -> None:
        line = json.dumps(obj) + "\n"
        if self.local:
            self._file.write(line)
            self._file.flush()
        else:
            self._lines.append(line)
            self.path.write_text("".join(self._lines))

    def close(self) -> None:
        if self.local:
            self._file.close()
