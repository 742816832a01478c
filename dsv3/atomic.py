"""Files and directories that appear whole or not at all (used by the config, the data files, checkpoints and runs).

A reader never sees half a file: every file is written under a temporary name in its own directory, flushed to disk
(``fsync``), renamed over the target and the directory entry flushed too. A directory is replaced the same way:
``atomic_directory(path)`` yields a new directory beside ``path``; when the block ends without an error the new
directory takes the old one's place in one ``renameat2(RENAME_EXCHANGE)`` (Linux), so a reader opening ``path`` sees
the old content or the new, never a mix; elsewhere the old directory is renamed aside first (a reader may then find
nothing for an instant, but never a mix). Temporary names start with a dot and end in ``.tmp`` so a later writer
can remove what a killed one left (``remove_stale_temporaries``).

Files are created as readable as an ordinary file (``0o666`` less the umask), not with ``mkstemp``'s private mode.
This module imports nothing from the rest of the package.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (a rename is durable only once its directory is flushed)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # platforms that cannot open a directory (Windows): nothing to flush
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_file(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return tmp


def _commit_file(tmp: str, path: Path) -> None:
    os.chmod(tmp, 0o666 & ~_umask())  # a writer that replaced the temporary file may have made it private
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory, fsync and an atomic rename."""
    path = Path(path)
    tmp = _temp_file(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        _commit_file(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """``atomic_write_bytes`` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_file(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file`` through a temporary file, fsync and an atomic rename."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = _temp_file(path)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        _commit_file(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------- directories
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2():
    """libc's renameat2 (glibc >= 2.28), or None where it does not exist."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange(a: str | Path, b: str | Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    fn = _renameat2()
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system or kernel cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def temp_dir_beside(path: str | Path) -> Path:
    """A new empty directory next to ``path`` with a temporary name (as readable as an ordinary directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX))
    tmp.chmod(0o777 & ~_umask())
    return tmp


def replace_directory(new: str | Path, path: str | Path) -> None:
    """Put directory ``new`` where ``path`` is (atomically where the OS can swap) and delete the old content."""
    new, path = Path(new), Path(path)
    fsync_dir(new)
    if not path.exists():
        os.rename(new, path)
    elif exchange(new, path):
        shutil.rmtree(new, ignore_errors=True)  # `new` now holds the old content
    else:
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old.", suffix=TMP_SUFFIX))
        os.rename(path, old / "d")
        os.rename(new, path)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_directory(path: str | Path, keep: callable | None = None) -> Iterator[Path]:
    """Build a directory beside ``path``, then swap it in whole (see the module docstring).

    ``keep(name) -> bool`` selects files of the old directory to carry over (hard links, or copies where links are
    impossible) unless the block wrote a file of that name; other old files are dropped with the old directory.
    On an error the new directory is removed and ``path`` is untouched.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory")
    tmp = temp_dir_beside(path)
    try:
        yield tmp
        if keep is not None and path.is_dir():
            for old in path.iterdir():
                target = tmp / old.name
                if target.exists() or not keep(old.name):
                    continue
                if old.is_dir():
                    shutil.copytree(old, target)
                else:
                    try:
                        os.link(old, target)
                    except OSError:
                        shutil.copy2(old, target)
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temporaries(directory: str | Path, stem: str = "") -> list[Path]:
    """Delete the temporaries (``.{stem}.*.tmp``, or every ``.*.tmp``) a killed writer left in ``directory``."""
    directory = Path(directory)
    gone = []
    if not directory.is_dir():
        return gone
    for p in directory.glob(f".{stem}.*{TMP_SUFFIX}" if stem else f".*{TMP_SUFFIX}"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        gone.append(p)
    return gone
