"""Writing outputs without destroying anything: every file and folder minisd writes goes through here.

The rules (README, "Safe by default"):
  * An existing destination is refused unless the user passed --overwrite. Even then a folder is replaced only when
    it is an output of the same kind (a minisd folder, a diffusers folder, a training run) holding nothing else, and
    never when it is a source of the work, holds a source, or holds the working directory (`--out .`).
  * A file is written into a fresh private folder beside its destination (`tempfile.mkdtemp`: a new random name,
    created exclusively, mode 0700) and renamed into place. A symbolic link or file planted at any name (`X.tmp`,
    the destination itself) is never written through - a rename replaces a link, it does not follow it - an
    interrupted write leaves the previous file whole, and a write that fails (a full disk) removes its partial
    file and ends with one line (`WriteError`).
  * Destinations are checked before work starts (`check_file_dest`, `check_folder_dest`): a file where a folder is
    needed and the reverse, a path below a file, a folder that cannot be written.

`RunLock` keeps two trainers out of one run folder. Leftovers of a killed write are `.minisd-tmp-*` folders; a
run folder's are removed when it is resumed (`remove_leftovers`), elsewhere they are ignored.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field

from ..model import CONFIG_NAME, EXTRAS_NAME, SOURCE_NAME, UNET_FILE, VAE_FILE

try:
    import fcntl  # POSIX; elsewhere RunLock falls back to a pid file created exclusively
except ImportError:  # pragma: no cover
    fcntl = None

TMP_PREFIX = ".minisd-tmp-"


class WriteError(Exception):
    """An output that cannot or may not be written; one-line message naming the path."""


@dataclass
class Kind:
    """What a folder --overwrite may replace is: `markers` all present, every entry's name `allowed`."""
    what: str
    markers: tuple
    allowed: callable = field(default=lambda name: True)

    def refuses(self, path: str) -> str | None:
        """Why `path` is not a folder of this kind (None: it is)."""
        if not all(os.path.exists(os.path.join(path, m)) for m in self.markers):
            return f"has no {' + '.join(self.markers)}"
        foreign = sorted(n for n in os.listdir(path) if not n.startswith(TMP_PREFIX) and not self.allowed(n))
        if foreign:
            more = f" (+{len(foreign) - 3} more)" if len(foreign) > 3 else ""
            return f"holds what a {self.what} does not: {', '.join(foreign[:3])}{more}"
        return None


# What convert.py --overwrite may replace: folders it writes itself, holding nothing else (a model card, a single
# file downloaded beside a diffusers folder, ... are the user's).
MINISD = Kind("minisd folder", (CONFIG_NAME, UNET_FILE), lambda n: n in (
    CONFIG_NAME, UNET_FILE, VAE_FILE, EXTRAS_NAME, SOURCE_NAME) or bool(
    re.fullmatch(r"text_encoder(_\d+)?\.safetensors|tokenizer(_\d+)?", n)))
DIFFUSERS = Kind("diffusers folder", ("model_index.json",), lambda n: n == "model_index.json" or bool(
    re.fullmatch(r"unet|vae|vqvae|bert|scheduler|feature_extractor|safety_checker|text_encoder(_\d+)?|tokenizer(_\d+)?",
                 n)))


# ----------------------------------------------------------------------------------------------- checks
def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _inside(child: str, parent: str) -> bool:
    """`child` is `parent` or below it (both real paths)."""
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_parent(path: str) -> None:
    """The folder that will hold `path` can be made and written: its nearest existing ancestor is a folder (not a
    file: `a.txt/b.png`) that we may write into."""
    parent = os.path.dirname(os.path.abspath(path))
    probe = parent
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise WriteError(f"{path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise WriteError(f"{path}: folder {probe} is not writable")


def check_file_dest(path: str, overwrite: bool = False, protect=()) -> None:
    """A file may be written at `path`: not a folder; absent, or present with --overwrite and not a source."""
    if os.path.isdir(path):
        raise WriteError(f"{path} is a folder; a file name is needed here")
    if os.path.lexists(path):
        if not overwrite:
            raise WriteError(f"{path} exists: pass --overwrite to replace it, or choose another name")
        for p in protect:  # an input, or a file inside an input folder (a link to one resolves to it)
            if p and os.path.exists(p) and _inside(_real(path), _real(p)):
                raise WriteError(f"{path} is {'an input' if _real(path) == _real(p) else 'inside an input'} of this "
                                 f"command ({p}); it is never overwritten")
    check_parent(path)


def check_folder_dest(path: str, overwrite: bool = False, kind: Kind | None = None, protect=()) -> None:
    """A folder may be written at `path`: absent or empty; or, with --overwrite, a folder of `kind` that is neither
    a source (`protect`), nor holds one, nor holds the working directory."""
    if os.path.islink(path):
        raise WriteError(f"{path} is a symbolic link; give the real folder")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise WriteError(f"{path} is a file; a folder is needed here")
    check_parent(path)
    try:
        if not os.path.isdir(path) or not os.listdir(path):
            return
    except OSError as e:
        raise WriteError(f"{path}: cannot read the folder ({e.strerror})") from None
    if not overwrite:
        raise WriteError(f"{path} exists and is not empty: pass --overwrite to replace it, or choose another folder")
    real = _real(path)
    for p in [os.getcwd(), *protect]:
        if p and _inside(_real(p), real):
            what = "the working directory" if p == os.getcwd() else f"an input of this command ({p})"
            raise WriteError(f"{path} {'is' if _real(p) == real else 'holds'} {what}; it is never replaced")
    reason = kind.refuses(path) if kind else "is not an output of this command"
    if reason:
        raise WriteError(f"{path} is not replaced: --overwrite replaces only a {kind.what if kind else 'known output'}"
                         f", and it {reason}")


# ----------------------------------------------------------------------------------------------- writes
def is_io_error(e: BaseException) -> bool:
    """An error of the storage (full disk, read-only, quota), however the writer reports it: OSError from Python,
    RuntimeError from torch.save's C++ writer, SafetensorError (IoError) from safetensors."""
    text = str(e)
    return isinstance(e, OSError) or "IoError" in text or "file write failed" in text or "unexpected pos" in text


def _io_message(dest: str, e: BaseException) -> str:
    why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"{dest}: could not write ({why}); the partial file was removed, what was there is kept"


def _private_dir(parent: str) -> str:
    try:
        os.makedirs(parent, exist_ok=True)
        return tempfile.mkdtemp(prefix=TMP_PREFIX, dir=parent)  # a new name, created exclusively, mode 0700
    except OSError as e:
        raise WriteError(f"{parent}: cannot write there ({e.strerror})") from None


@contextlib.contextmanager
def atomic_path(dest: str):
    """Yield a path to write `dest`'s new content to (same base name, so writers that look at the extension work),
    inside a fresh private folder beside it; on success it replaces `dest` by one rename (a link at `dest` is
    replaced, not followed). Any failure removes the partial file; a storage error becomes one-line WriteError."""
    if os.path.isdir(dest) and not os.path.islink(dest):
        raise WriteError(f"{dest} is a folder; a file name is needed here")
    private = _private_dir(os.path.dirname(os.path.abspath(dest)))
    tmp = os.path.join(private, os.path.basename(dest))
    try:
        yield tmp
        os.replace(tmp, dest)
    except WriteError:
        raise
    except Exception as e:
        if is_io_error(e):
            raise WriteError(_io_message(dest, e)) from None
        raise
    finally:
        shutil.rmtree(private, ignore_errors=True)


def write_text(dest: str, text: str) -> None:
    with atomic_path(dest) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def append_text(path: str, text: str) -> None:
    """Append to a file of ours, never through a link (O_NOFOLLOW)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o644)
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise WriteError(_io_message(path, e) if e.errno != errno.ELOOP else f"{path} is a symbolic link") from None


def ensure_folder(path: str) -> str:
    """`path` as a real folder of ours to write into: made if absent; a link or file there is refused."""
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
        raise WriteError(f"{path} is {'a symbolic link' if os.path.islink(path) else 'a file'}; a folder is needed")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise WriteError(f"{path}: cannot make the folder ({e.strerror})") from None
    return path


def remove_leftovers(folder: str) -> None:
    """Remove the private folders of writes that were killed (only ours: `.minisd-tmp-*` folders, not links)."""
    for name in os.listdir(folder):
        p = os.path.join(folder, name)
        if name.startswith(TMP_PREFIX) and os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(out: str, overwrite: bool = False, kind: Kind | None = None, protect=()):
    """Yield a fresh private folder to fill; on success it takes `out`'s place by one rename (a replaced folder is
    moved aside first and removed only once the new one is in place), on any failure it is removed. The
    destination is checked before (and again right before the swap: something may have appeared meanwhile)."""
    check_folder_dest(out, overwrite, kind, protect)
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    tmp = _private_dir(parent)
    try:
        yield tmp
        check_folder_dest(out, overwrite, kind, protect)
        old = None
        if os.path.isdir(out):
            old = tempfile.mkdtemp(prefix=TMP_PREFIX, dir=parent)
            os.rename(out, old)  # onto an empty folder of ours: allowed, atomic
        try:
            os.rename(tmp, out)
        except OSError:
            if old:
                os.rename(old, out)
            raise
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except WriteError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and is_io_error(e):
            raise WriteError(_io_message(out, e)) from None
        raise


# ----------------------------------------------------------------------------------------------- run lock
class RunLock:
    """An exclusive lock on a folder: `fcntl.flock` on `<folder>/train.lock` (released by the kernel when the process
    ends, however it ends, so a lock left by a dead process is no lock), the holder's pid written inside for the
    message. Without fcntl: the file is created exclusively and a pid that no longer runs is taken over."""
    NAME = "train.lock"

    def __init__(self, folder: str, what: str = "train.py"):
        self.folder, self.what, self.fd = folder, what, None
        self.path = os.path.join(folder, self.NAME)

    @classmethod
    def holder(cls, folder: str) -> str | None:
        """The pid (maybe "") of another process holding `folder`'s lock; None when it is free. Makes no file."""
        path = os.path.join(folder, cls.NAME)
        if not os.path.isfile(path) or os.path.islink(path):
            return None
        pid = _read(path)
        if fcntl is None:  # pragma: no cover
            return pid if pid.isdigit() and _alive(int(pid)) else None
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None
        except OSError:
            return pid
        finally:
            os.close(fd)  # closing releases a lock taken here

    def busy(self, pid: str) -> WriteError:
        return WriteError(f"{self.folder} is in use by another {self.what} (pid {pid or '?'}): wait for it to end "
                          "or stop it; two runs in one folder would mix their files")

    def acquire(self) -> "RunLock":
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        if fcntl is None:  # pragma: no cover - pid-file fallback
            flags |= os.O_EXCL
        try:
            self.fd = os.open(self.path, flags, 0o644)
        except FileExistsError:  # pragma: no cover
            pid = _read(self.path)
            if pid.isdigit() and _alive(int(pid)):
                raise self.busy(pid) from None
            os.remove(self.path)  # stale: its process is gone
            return self.acquire()
        except OSError as e:
            raise WriteError(f"{self.path}: cannot open the run's lock file ({e.strerror})") from None
        if fcntl is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pid = _read(self.path)
                os.close(self.fd)
                self.fd = None
                raise self.busy(pid) from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())
        return self

    def release(self) -> None:
        if self.fd is not None:
            if fcntl is None:  # pragma: no cover
                os.remove(self.path)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:  # pragma: no cover - pid-file fallback only
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
