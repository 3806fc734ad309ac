"""File writes: atomic, with the user's permissions, and only over files dpls wrote.

**Atomic.** Every small text or JSON file the project writes — metadata, configs, metrics,
study state, the README's generated section — goes through here: write a temporary file
beside the target, flush it to disk, rename it over the target. Readers (and a crash) see
the old file or the new one, never half of one.

**Permissions.** Files are created ``0666 & ~umask`` and folders ``0777 & ~umask``, as every
other tool does (`tempfile` alone would make them private: 0600 / 0700), so a colleague
or another service account can read a shared run.

**One writer.** A command that writes a run or a study holds `exclusive_lock` on its folder
for as long as it writes: a second writer is refused at once with the holder's PID. The lock
is an ``flock`` on ``.dpls-lock``, which the operating system releases when the process dies,
so a killed process never leaves a folder locked.

**Ownership.** A dpls command overwrites or deletes only what dpls wrote. Every folder that
an output file goes into keeps a small manifest, ``.dpls-owned.json``, naming the files dpls
wrote there with their size and content hash. `check_replaceable` refuses to touch a file
that is not listed, or that changed since (the user edited it: it is theirs now);
`mark_owned` records a file after it is written. One mechanism for every writer: bench
JSON, evaluation outputs, reports, exports.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

OWNED_FILE = ".dpls-owned.json"  # the manifest of the files dpls wrote in a folder
LOCK_FILE = ".dpls-lock"  # held (flock) by the one process writing a run or study folder
_BOOKKEEPING = frozenset({OWNED_FILE, LOCK_FILE})  # dpls's own files in a folder, never the user's
_HASH_LIMIT = 64 << 20  # larger files are recognised by size and modification time


# -- permissions ------------------------------------------------------------------------------


def current_umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | Path) -> None:
    """Give a file ``0666 & ~umask`` and a folder ``0777 & ~umask`` (what `open` and `mkdir`
    give; `tempfile.mkstemp` / `mkdtemp` make them private instead)."""
    path = Path(path)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~current_umask())


def mkdtemp_beside(path: str | Path) -> Path:
    """A fresh temporary folder next to ``path`` (same file system: it can be renamed onto
    it), with the umask's permissions."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    apply_umask(tmp)
    return tmp


def write_text_atomic(path: str | Path, text: str) -> Path:
    """``text`` (UTF-8) to ``path`` by temporary file, fsync and rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, obj: Any, **dumps: Any) -> Path:
    """``obj`` as indented JSON (plus a final newline); ``dumps`` go to `json.dumps` (e.g. ``default=``)."""
    return write_text_atomic(path, json.dumps(obj, indent=2, **dumps) + "\n")


def write_owned_text(path: str | Path, text: str) -> Path:
    """`write_text_atomic` over a file that `check_replaceable` allowed, recorded as dpls's."""
    write_text_atomic(path, text)
    mark_owned(path)
    return Path(path)


def write_owned_json(path: str | Path, obj: Any, **dumps: Any) -> Path:
    """`write_json_atomic`, recorded as dpls's (see `write_owned_text`)."""
    write_json_atomic(path, obj, **dumps)
    mark_owned(path)
    return Path(path)


# -- ownership: what dpls wrote, and only that, may be replaced ---------------------------------


def _signature(path: Path) -> dict[str, Any]:
    """What identifies a file's current content: size, and a hash (small files) or mtime."""
    st = path.stat()
    if st.st_size > _HASH_LIMIT:
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"size": st.st_size, "sha256": digest.hexdigest()}


def _manifest(folder: Path) -> dict[str, Any]:
    try:
        doc = json.loads((folder / OWNED_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    files = doc.get("files") if isinstance(doc, dict) else None
    return files if isinstance(files, dict) else {}


def is_owned(path: str | Path) -> bool:
    """``path`` is a file that dpls wrote and nobody changed since (its folder's manifest says so)."""
    path = Path(path)
    if not path.is_file() or path.is_symlink():
        return False
    entry = _manifest(path.parent).get(path.name)
    if not isinstance(entry, dict):
        return False
    try:
        return _signature(path) == entry
    except OSError:
        return False


def mark_owned(*paths: str | Path) -> None:
    """Record files dpls just wrote in their folders' manifests (so a later run may replace them)."""
    by_folder: dict[Path, list[Path]] = {}
    for p in paths:
        p = Path(p)
        by_folder.setdefault(p.parent, []).append(p)
    for folder, files in by_folder.items():
        entries = {name: e for name, e in _manifest(folder).items() if (folder / name).is_file()}
        for f in files:
            if f.is_file():
                entries[f.name] = _signature(f)
        write_json_atomic(folder / OWNED_FILE, {"written_by": "dpls", "files": entries})


def forget_owned(*paths: str | Path) -> None:
    """Delete files dpls wrote earlier (a stale output of a previous run); others are left alone."""
    for p in paths:
        if is_owned(p):
            Path(p).unlink()


def check_replaceable(path: str | Path, what: str = "output", *, create: bool = False) -> Path:
    """``path`` may be written: it does not exist, or it is a file dpls wrote (unchanged since),
    and its folder is writable (exists, or with ``create`` can be created). ``ValueError``
    otherwise, before any work; ``what`` names the option in the message (``--json``, ``--out``)."""
    path = Path(path)
    if not create and not path.parent.is_dir():
        raise ValueError(f"{what}: cannot write {path}: the folder {path.parent} does not exist")
    if path.is_symlink() or (path.exists() and not path.is_file()):
        kind = "a symbolic link" if path.is_symlink() else "a directory" if path.is_dir() else "not a file"
        raise ValueError(f"{what}: {path} is {kind}; give the path of a file to write")
    if path.exists() and not is_owned(path):
        raise ValueError(
            f"{what}: {path} exists and was not written by dpls (or was changed since); dpls never "
            "overwrites a file it did not write: choose another path or move that file away"
        )
    check_writable_dir(path.parent, what)
    return path


def check_writable_dir(folder: str | Path, what: str = "output") -> Path:
    """``folder`` exists (or can be created) and this user may write in it, else ``ValueError``."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what}: cannot create the folder {folder}: a file is in the way ({existing})")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: no permission to write in {existing}; choose a folder you can write to")
    return folder


def unowned_files(folder: str | Path, names: Iterable[str] | None = None) -> list[Path]:
    """Files under ``folder`` (or just ``names`` in it) that dpls did not write: what replacing
    or deleting the folder (or writing those names) would destroy."""
    folder = Path(folder)
    if names is not None:
        candidates = [folder / n for n in names if (folder / n).exists() or (folder / n).is_symlink()]
    else:
        candidates = list(folder.rglob("*"))  # folders too: dpls records files only
    return [
        p
        for p in candidates
        if p.name not in _BOOKKEEPING
        and not (p.is_dir() and not p.is_symlink() and names is None and _only_owned(p))
        and not is_owned(p)
    ]


def _only_owned(folder: Path) -> bool:
    """A folder whose every file dpls wrote (and that holds at least one)."""
    files = [p for p in folder.rglob("*") if not p.is_dir() and p.name not in _BOOKKEEPING]
    return bool(files) and all(is_owned(p) for p in files)


def check_output_dir(folder: str | Path, names: Iterable[str], what: str = "out") -> Path:
    """``folder`` is (or can become) a writable folder where writing ``names`` destroys
    nothing the user owns (each is absent or a file dpls wrote), else ``ValueError``."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{what}: {folder} exists and is not a directory; give a folder")
    check_writable_dir(folder, what)
    if folder.is_dir():
        theirs = unowned_files(folder, names)
        if theirs:
            raise ValueError(
                f"{what}: {folder} holds {', '.join(p.name for p in theirs)}, not written by dpls (or changed "
                "since); dpls never overwrites them: choose another folder or move them away"
            )
    return folder


# -- one writer per folder ----------------------------------------------------------------------


class FolderInUse(ValueError):
    """Another live process holds the folder's lock (the message names its PID)."""


@contextmanager
def exclusive_lock(folder: str | Path, what: str = "folder") -> Iterator[Path]:
    """Hold the write lock of ``folder`` (created if missing) for the ``with`` block.

    A second process asking for the same folder gets `FolderInUse` at once, naming the holder's
    PID and ``what`` the folder is ("run", "study"). The lock is ``flock`` on ``LOCK_FILE``: the
    operating system drops it when the holder exits or is killed, so a crash leaves nothing
    stuck. A folder this call created and that is empty again afterwards is removed, so a
    command refused later (bad input) leaves no trace.
    """
    folder = Path(folder)
    created = not folder.exists()
    path = folder / LOCK_FILE
    fd = _lock_file(path, what)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield folder
    finally:
        with suppress(OSError):
            if created and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
                path.unlink()  # still locked: a process waiting on this file finds it gone and retries
                folder.rmdir()
        os.close(fd)  # releases the lock


def _lock_file(path: Path, what: str) -> int:
    """An open descriptor of ``path`` holding its ``flock``, or `FolderInUse`."""
    import fcntl  # POSIX; imported here so that `dpls._io` still imports where it is missing

    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # os.open applies the umask
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise FolderInUse(
                f"{what} {path.parent} is being written by another dpls process (pid {holder}); wait "
                "for it to finish or stop it, then run this again"
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed the file (and folder) while we waited: start again
