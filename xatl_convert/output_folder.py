"""Where a conversion writes, and the rules that keep the user's other files safe.

An output folder is built in a staging folder beside OUT and renamed into place at the end, so an error or an
interrupt leaves nothing behind. Around that:
- What OUT may be (never an input, the current or home folder; replaced only when xatl wrote it) is the write
  guard's to say (`write_guard`), for every command alike.
- A lock file beside OUT (`flock`, released by the kernel even after SIGKILL) keeps two conversions from writing the
  same OUT; whoever holds it removes the staging folders of runs that were killed.
- The final rename never replaces anything unless `--force` was given: a folder that appeared at OUT while the
  conversion ran is kept, and the conversion fails instead (`renameat2(RENAME_NOREPLACE)` where the kernel has it).
- Parent folders created for OUT are removed again if the conversion fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from xatl_convert.errors import OutputExistsError, OutputWriteError, UnsafeOutputError, XatlError
from xatl_convert.write_guard import WriteTarget, check_write_targets, is_xatl_folder, target_location

try:
    import fcntl
except ImportError:  # pragma: no cover  (Windows: no advisory locks; the no-replace rename still protects OUT)
    fcntl = None  # type: ignore[assignment]

PARTIAL_TAG = ".xatl-partial-"
RETIRED_TAG = ".xatl-replaced-"
LOCK_TAG = ".xatl-lock"
SCRATCH_TAG = ".xatl-scratch-"


def output_location(out: str | Path) -> Path:
    """OUT as an absolute path whose parent has its symlinks resolved: the entry a command creates or replaces.

    The last component is kept as given, so `--force` on a symlink replaces the link, never what it points to.
    """
    return target_location(WriteTarget("--out", Path(out)))


def ensure_writable(out: str | Path, force: bool, protected: dict[Path, str] | None = None) -> None:
    """The write guard's rules for OUT (see write_guard): checked before planning, and again by the final rename."""
    check_write_targets([WriteTarget("--out", Path(out))], protected or {}, force)


@contextlib.contextmanager
def staged_output(out: str | Path, force: bool, needed_bytes: int = 0) -> Iterator[Path]:
    """Yield an empty staging folder beside OUT; when the block completes, move it to OUT (replacing only if forced).

    On any failure (an exception, Ctrl-C) nothing is left behind: no staging folder, no lock, no created parents.
    """
    location = output_location(out)
    created = _create_parents(location.parent, out)
    try:
        with _output_lock(location, out):
            _remove_stale_staging(location)
            ensure_writable(out, force)
            _check_free_space(location.parent, needed_bytes, out)
            staging = location.parent / f".{location.name}{PARTIAL_TAG}{os.getpid()}"
            try:
                staging.mkdir()
                yield staging
                _move_into_place(staging, location, out, force)
            finally:
                remove_entry(staging)
    except BaseException:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty
        raise


@contextlib.contextmanager
def scratch_folder_beside(out: str | Path) -> Iterator[Path]:
    """A temporary folder beside OUT (for work that OUT is made from), removed at the end; parents created for it
    are removed again if the work fails."""
    location = output_location(out)
    created = _create_parents(location.parent, out)
    try:
        with tempfile.TemporaryDirectory(dir=location.parent, prefix=f".{location.name}{SCRATCH_TAG}") as work:
            yield Path(work)
    except BaseException:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty
        raise


def new_file_mode() -> int:
    """The mode a newly created file gets: 0o666 less the umask (0o644 under umask 022), for files that a library
    writes through a private temporary file (mode 0o600) and renames into place."""
    return 0o666 & ~_umask()


def _umask() -> int:
    """The process's umask, read where Linux shows it (setting it to read it back is not thread-safe)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _create_parents(parent: Path, out: str | Path) -> list[Path]:
    """Create OUT's missing parents; return the ones created, outermost first."""
    missing = []
    folder = parent
    while not folder.exists():
        if folder.is_symlink():  # a dangling link: mkdir would fail with a confusing message
            raise OutputWriteError(f"{out}: parent {folder} is a broken symbolic link")
        missing.append(folder)
        folder = folder.parent
    if folder.exists() and not folder.is_dir():
        raise OutputWriteError(f"{out}: cannot create it inside {folder}, which is a file, not a folder")
    created = []
    try:
        for folder in reversed(missing):
            folder.mkdir()
            created.append(folder)
    except OSError as error:
        for done in reversed(created):
            with contextlib.suppress(OSError):
                done.rmdir()
        raise OutputWriteError(f"{out}: cannot create folder {folder}: {error.strerror or error}") from None
    return created


def _output_lock(location: Path, out: str | Path) -> contextlib.AbstractContextManager[None]:
    """Hold `.NAME.xatl-lock` beside OUT for the whole write; a second conversion to the same OUT fails at once."""
    busy = OutputExistsError(f"{out}: another xatl conversion is writing it now; wait for it, or choose another --out")
    return exclusive_lock(location, out, busy)


@contextlib.contextmanager
def exclusive_lock(location: Path, name: str | Path, busy: XatlError) -> Iterator[None]:
    """Hold the lock file `.NAME.xatl-lock` beside `location` (an output or checkpoint folder) while the block runs.

    `flock` is released by the kernel even after SIGKILL, so a lock never outlives its process. A second holder fails
    at once with `busy`; a parent folder that cannot be written fails with OutputWriteError naming `name`.
    """
    if fcntl is None:  # pragma: no cover
        yield
        return
    lock_path = location.parent / f".{location.name}{LOCK_TAG}"
    while True:
        try:
            descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise OutputWriteError(f"{name}: cannot write in {location.parent}: {error.strerror or error}") from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise busy from None
        # The holder before us unlinks the file as it finishes: make sure we locked the file that is still there.
        try:
            same = os.path.samestat(os.fstat(descriptor), os.stat(lock_path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(descriptor)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock_path.unlink()
        os.close(descriptor)


def _remove_stale_staging(location: Path) -> None:
    """Remove staging and retired folders of earlier runs that were killed (we hold the lock: none is running)."""
    for tag in (PARTIAL_TAG, RETIRED_TAG):
        for leftover in location.parent.glob(f".{glob.escape(location.name)}{tag}*"):
            remove_entry(leftover)


def _check_free_space(folder: Path, needed_bytes: int, out: str | Path) -> None:
    """Fail before writing a byte when the weights cannot fit (an overlarge target config, a nearly full disk)."""
    if needed_bytes <= 0:
        return
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # unknown: the write itself will tell
    if needed_bytes > free:
        raise OutputWriteError(
            f"{out}: needs {_gib(needed_bytes)} (weights and tokenizer) but {folder} has {_gib(free)} free; "
            "free some space or choose another --out"
        )


def _gib(count: int) -> str:
    """Bytes in GiB, with enough digits that a shortfall of a few MiB does not print as 'needs 0.26, has 0.26'."""
    return f"{count / 1024**3:,.3f} GiB"


def _move_into_place(staging: Path, location: Path, out: str | Path, force: bool) -> None:
    """Rename the finished staging folder to OUT; an existing OUT is replaced only when forced."""
    exists = location.exists() or location.is_symlink()
    if not exists or not force:
        try:
            rename_without_replacing(staging, location)
        except FileExistsError:
            raise OutputExistsError(
                f"{out}: appeared while converting; it was left as it is and nothing was written "
                "(pass --force to replace it)"
            ) from None
        return
    if not location.is_symlink() and location.is_dir() and any(location.iterdir()) and not is_xatl_folder(location):
        raise UnsafeOutputError(f"{out}: became a folder xatl did not write while this ran; it was left as it is")
    retired = location.parent / f".{location.name}{RETIRED_TAG}{os.getpid()}"
    location.rename(retired)
    try:
        rename_without_replacing(staging, location)
    except OSError:
        with contextlib.suppress(OSError):
            rename_without_replacing(retired, location)  # put the old OUT back
        raise
    remove_entry(retired)


def remove_entry(path: Path) -> None:
    """Delete a file, a symlink (not its target) or a folder tree; quietly if it is already gone."""
    if path.is_symlink() or path.is_file():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def rename_without_replacing(source: Path, destination: Path) -> None:
    """Rename, failing with FileExistsError if `destination` exists (even an empty folder, which rename replaces)."""
    renameat2 = _renameat2()
    if renameat2 is not None:
        result = renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(destination), _RENAME_NOREPLACE)
        if result == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            raise FileExistsError(code, os.strerror(code), str(destination))
        if code not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # else: this filesystem lacks the flag
            raise OSError(code, os.strerror(code), str(destination))
    if destination.exists() or destination.is_symlink():
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(destination))
    os.rename(source, destination)


def _renameat2():
    """glibc's renameat2, or None where the C library lacks it (musl before 1.2.4, macOS)."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function
