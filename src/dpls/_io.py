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
that is not listed, or that changed since (the user edited it: it is theirs now). A file is
recorded *before* it appears under its name (`owned_output`: written under a temporary name,
recorded, then renamed), so no kill can leave a file of dpls's unrecorded; a temporary left by
a kill ends in ``.dpls-tmp`` and is dpls's own bookkeeping, never mistaken for the user's.
One mechanism for every writer: bench JSON, evaluation outputs, reports, plots, exports.

**Paths.** `check_path` turns a name or path longer than the file system allows into a
one-line error before any work (the bare ``OSError`` comes later, mid-work).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import inspect
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

OWNED_FILE = ".dpls-owned.json"  # the manifest of the files dpls wrote in a folder
LOCK_FILE = ".dpls-lock"  # held (flock) by the one process writing a run or study folder
TMP_SUFFIX = ".dpls-tmp"  # a file being written (left behind only by a kill): never the user's
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


def is_temporary(name: str) -> bool:
    """A file name `write_text_atomic` / `owned_output` write under before the rename."""
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def _temporary_beside(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    return Path(tmp)


def fsync_path(path: str | Path) -> None:
    """Flush a file's (or a folder's entries') writes to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """``text`` (UTF-8) to ``path`` by temporary file, fsync and rename."""
    path = Path(path)
    tmp = _temporary_beside(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        fsync_path(tmp)
        apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, obj: Any, **dumps: Any) -> Path:
    """``obj`` as indented JSON (plus a final newline); ``dumps`` go to `json.dumps` (e.g. ``default=``)."""
    return write_text_atomic(path, json.dumps(obj, indent=2, **dumps) + "\n")


@contextmanager
def owned_output(path: str | Path) -> Iterator[Path]:
    """Write ``path`` (which `check_replaceable` allowed) as dpls's own: the ``with`` block
    writes the yielded temporary file beside it; then the new content is recorded in the
    folder's manifest, the temporary renamed onto ``path``, and the record of the old
    content dropped. A kill at any instant leaves ``path`` recorded (old or new content) and
    at most a ``.dpls-tmp`` file; an error in the block leaves ``path`` as it was.

        with owned_output(out / "val_ce.png") as tmp:
            fig.savefig(tmp, format="png")
    """
    path = Path(path)
    tmp = _temporary_beside(path)
    try:
        yield tmp
        fsync_path(tmp)
        apply_umask(tmp)
        new = _signature(tmp)  # a rename keeps size, content and mtime
        old = _manifest(path.parent).get(path.name)
        pending = [new, *(old if isinstance(old, list) else [old] if isinstance(old, dict) else [])]
        _record(path.parent, {path.name: pending})  # both contents are ours while the rename is pending
        os.replace(tmp, path)
        _record(path.parent, {path.name: new})
    finally:
        tmp.unlink(missing_ok=True)


def write_owned_text(path: str | Path, text: str) -> Path:
    """``text`` (UTF-8) to a file that `check_replaceable` allowed, recorded as dpls's before
    it appears (`owned_output`)."""
    with owned_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_owned_json(path: str | Path, obj: Any, **dumps: Any) -> Path:
    """`write_json_atomic`, recorded as dpls's (see `write_owned_text`)."""
    return write_owned_text(path, json.dumps(obj, indent=2, **dumps) + "\n")


# -- paths the file system can hold -----------------------------------------------------------

_NAME_MAX, _PATH_MAX = 255, 4096  # Linux, macOS and Windows file systems: where pathconf cannot say


def _limit(path: str, name: str, default: int) -> int:
    """``os.pathconf`` of the nearest existing folder above ``path`` (the file system it lands on)."""
    folder = os.path.abspath(path)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        return int(os.pathconf(folder, name)) or default
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows), or no limit known
        return default


def _shortened(text: str) -> str:
    return text if len(text) <= 60 else f"{text[:40]}…{text[-12:]}"


def check_path(path: str | Path, what: str = "path") -> Path:
    """``path`` can exist here: no name in it is longer than the file system allows (NAME_MAX,
    255 bytes on most) and the whole path is shorter than PATH_MAX (4096 bytes on Linux);
    else a one-line ``ValueError`` naming ``what`` (the option), before any work."""
    path = Path(path)
    text = os.fspath(path)
    name_max = _limit(text, "PC_NAME_MAX", _NAME_MAX)
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > name_max:
            raise ValueError(
                f"{what}: the name {_shortened(part)!r} is {size} bytes long; a file or folder name may be at "
                f"most {name_max} bytes here: choose a shorter name"
            )
    size = len(os.fsencode(os.path.abspath(text)))
    path_max = _limit(text, "PC_PATH_MAX", _PATH_MAX)
    if size >= path_max:
        raise ValueError(
            f"{what}: the path {_shortened(text)!r} is {size} bytes long (from the root); a path may be at "
            f"most {path_max - 1} bytes here: choose a shorter one"
        )
    return path


def exception_chain(err: BaseException) -> Iterator[BaseException]:
    """``err``, its causes and contexts, and the per-rank errors of a
    ``torch.distributed.checkpoint.CheckpointException`` (``failures``), each once."""
    seen: set[int] = set()
    stack: list[BaseException] = [err]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack.extend(x for x in (e.__cause__, e.__context__) if x is not None)
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            for value in failures.values():
                stack.extend(
                    x
                    for x in (value if isinstance(value, tuple) else (value,))
                    if isinstance(x, BaseException)
                )


# torch's zip writer (checkpoints) reports a failed write without its errno
_TORCH_WRITE_FAILURES = ("PytorchStreamWriter failed", "unexpected pos", "file write failed")


def write_failure(err: BaseException) -> str | None:
    """Why a file could not be written, when ``err`` says the disk is full, a quota is reached
    or the file size limit (``ulimit -f``; Python ignores SIGXFSZ, so the write fails with
    EFBIG) is exceeded; None for any other error."""
    reasons = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is used up",
        errno.EFBIG: "a file reached the size limit of this process (ulimit -f)",
    }
    for e in exception_chain(err):
        if isinstance(e, OSError) and e.errno in reasons:
            where = f" ({e.filename})" if e.filename else ""
            return f"a file could not be written{where}: {reasons[e.errno]}"
        if "No space left on device" in str(e):
            return f"a file could not be written: {reasons[errno.ENOSPC]}"
        if isinstance(e, RuntimeError) and any(m in str(e) for m in _TORCH_WRITE_FAILURES):
            return f"a file could not be written: the disk is full or {_size_limit()}"
    return None


def _size_limit() -> str:
    """The file size limit of this process, in words."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError, ValueError):
        return "a file size limit applies"
    if soft == resource.RLIM_INFINITY:
        return "a file size limit applies"
    return f"a file exceeded this process's size limit of {soft:,} bytes (ulimit -f)"


def path_error(err: OSError) -> str | None:
    """The one-line message for a path the file system cannot hold (ENAMETOOLONG), else None."""
    if err.errno != errno.ENAMETOOLONG:
        return None
    name = os.fsdecode(err.filename) if err.filename is not None else ""
    try:
        check_path(name)
    except ValueError as found:
        return str(found).removeprefix("path: ")
    return f"{_shortened(name)!r}: a name in this path is too long for the file system; choose a shorter one"


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
    """``path`` is a file that dpls wrote and nobody changed since (its folder's manifest says so;
    while `owned_output` renames, the entry lists both the old and the new content)."""
    path = Path(path)
    if not path.is_file() or path.is_symlink():
        return False
    entry = _manifest(path.parent).get(path.name)
    accepted = entry if isinstance(entry, list) else [entry]
    if not any(isinstance(e, dict) for e in accepted):
        return False
    try:
        return _signature(path) in accepted
    except OSError:
        return False


def _record(folder: Path, entries: dict[str, Any]) -> None:
    """Set manifest ``entries`` of ``folder`` (name → signature, or a list of them); entries of
    files that are gone are dropped."""
    kept = {name: e for name, e in _manifest(folder).items() if (folder / name).is_file()}
    write_json_atomic(folder / OWNED_FILE, {"written_by": "dpls", "files": {**kept, **entries}})


def mark_owned(*paths: str | Path) -> None:
    """Record files dpls wrote in their folders' manifests (so a later run may replace them).
    A new file should rather be written with `owned_output`, which records it before it appears."""
    by_folder: dict[Path, list[Path]] = {}
    for p in paths:
        p = Path(p)
        by_folder.setdefault(p.parent, []).append(p)
    for folder, files in by_folder.items():
        _record(folder, {f.name: _signature(f) for f in files if f.is_file()})


def forget_owned(*paths: str | Path) -> None:
    """Delete files dpls wrote earlier (a stale output of a previous run); others are left alone."""
    for p in paths:
        if is_owned(p):
            Path(p).unlink()


def check_replaceable(path: str | Path, what: str = "output", *, create: bool = False) -> Path:
    """``path`` may be written: it does not exist, or it is a file dpls wrote (unchanged since),
    and its folder is writable (exists, or with ``create`` can be created). ``ValueError``
    otherwise, before any work; ``what`` names the option in the message (``--json``, ``--out``)."""
    path = check_path(path, what)
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
    folder = check_path(folder, what)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(
            f"{what}: cannot create the folder {folder}: a file is in the way ({existing} exists and is not "
            "a directory)"
        )
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
        if not _is_bookkeeping(p)
        and not (p.is_dir() and not p.is_symlink() and names is None and _only_owned(p))
        and not is_owned(p)
    ]


def _is_bookkeeping(path: Path) -> bool:
    """dpls's manifest, lock file, or a temporary a kill left (never the user's)."""
    return path.name in _BOOKKEEPING or (is_temporary(path.name) and path.is_file() and not path.is_symlink())


def _only_owned(folder: Path) -> bool:
    """A folder whose every file dpls wrote (and that holds at least one)."""
    files = [p for p in folder.rglob("*") if not p.is_dir() and not _is_bookkeeping(p)]
    return bool(files) and all(is_owned(p) for p in files)


def check_output_dir(folder: str | Path, names: Iterable[str], what: str = "out") -> Path:
    """``folder`` is (or can become) a writable folder where writing ``names`` destroys
    nothing the user owns (each is absent or a file dpls wrote), else ``ValueError``."""
    folder = check_path(folder, what)
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
    stuck. A folder this call created and that is empty again afterwards is removed, and a lock
    file it created in a folder whose files did not change is removed, so a command refused
    later (bad input) leaves no trace.
    """
    folder = check_writable_dir(folder, what)  # a file in the way, no permission: said first
    created = not folder.exists()
    path = folder / LOCK_FILE
    before = None if created or path.exists() else _names(folder)
    fd = _lock_file(path, what)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield folder
    finally:
        with suppress(OSError):
            # still locked while unlinked: a process waiting on this file finds it gone and retries
            if created and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
                path.unlink()
                folder.rmdir()
            elif before is not None and _names(folder) == before:
                path.unlink()
        os.close(fd)  # releases the lock


def one_writer(argument: str, what: str, *, file: bool = False) -> Callable[[F], F]:
    """Decorator: the function holds `exclusive_lock` on the folder its ``argument`` names (the
    folder of that file, with ``file``) for the whole call, from its checks to its last file.
    A None argument takes no lock (nothing is written)."""

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            target = signature.bind(*args, **kwargs).arguments.get(argument)
            if target is None:
                return fn(*args, **kwargs)
            with exclusive_lock(Path(target).parent if file else target, what):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != LOCK_FILE)


def _lock_file(path: Path, what: str) -> int:
    """An open descriptor of ``path`` holding its ``flock``, or `FolderInUse`."""
    import fcntl  # POSIX; imported here so that `dpls._io` still imports where it is missing

    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # os.open applies the umask
        except OSError as err:  # a file in the way, a read-only folder, ...: said before any work
            raise ValueError(
                f"{what} {path.parent}: cannot create its lock file {LOCK_FILE} ({err.strerror or err}); "
                "choose a folder this user can write to"
            ) from None
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
