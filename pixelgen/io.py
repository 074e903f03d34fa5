"""Atomic file writes: everything is written under a temporary name and renamed when complete, so a reader
never takes a half-written file for a finished one."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

_TEMP_SUFFIX = ".tmp"  # atomic_write's temporary files: .<name>.<random>.tmp beside <name>
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` then rename tmp_path to `path` (same directory, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes owner-only files; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def leftover_temps(directory: str | Path, name_pattern: str) -> list[Path]:
    """The temporary files `atomic_write` left in `directory` for names matching the glob `name_pattern` when
    its writer was killed between write and rename: complete or not, never read. Remove them only where no
    writer of those names can be running (under the lock that serialises them, or once they are all done)."""
    return sorted(Path(directory).glob(f".{name_pattern}.*{_TEMP_SUFFIX}"))


def atomic_write_file(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """`atomic_write` for writers that take an open binary file (torch.save, np.savez: given a file name numpy
    would append ".npz" to the temporary one)."""
    def to_file(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it count as complete

    return atomic_write(path, to_file)


def atomic_write_text(path: str | Path, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} '{path}' does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} '{path}' is not valid JSON ({err}); delete it and rerun the stage") from None


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
