"""Object storage behind one small interface. `file://` here; `s3://` joins it later.

Keys are '/'-separated. Writes are atomic per object (temp file + rename), so a reader
never sees half an object; a checkpoint as a whole is made atomic by its manifest.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from trainer.spec import SpecError


class LocalStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def uri(self) -> str:
        return f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / key

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def get(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(
            str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file() and not p.name.startswith(".tmp-")
        )

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)


def open_store(uri: str, job_name: str) -> LocalStore:
    """The job's own folder under the spec's checkpoint URI."""
    if not uri.startswith("file://"):
        raise SpecError(f"spec.checkpoint.uri: unsupported scheme in {uri!r}; use file://")
    root = Path(uri.removeprefix("file://")).expanduser()
    try:
        (root / job_name).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SpecError(f"spec.checkpoint.uri: cannot create {root / job_name}: {err.strerror}") from None
    return LocalStore(root.resolve() / job_name)
