"""Shared by tests/test_safe_writes.py and tests/test_safe_train.py: run a command as a subprocess (optionally with a
fault injected by a small patch run before it), judge a refusal the way the audit of issue 15 did, and snapshot
folders so "nothing that was there destroyed, nothing left" can be asserted."""
import importlib
import os
import subprocess
import sys
from types import SimpleNamespace

from conftest import ROOT

# Runs a command's file as __main__ after `patch` (Python source) has run in the same process: how a full disk or a
# read-only folder is simulated (the tests run as root, for whom permission bits do not bind).
WRAP = """
import errno, os, sys, runpy
{patch}
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# OSError(ENOSPC) on the N-th call of a writer `module.attr(obj_or_self, path, ...)`, after writing some bytes to the
# path as a full disk would: the partial file must be removed and what was there kept.
ENOSPC = """
import importlib
_mod = importlib.import_module({module!r})
_owner = _mod if {cls!r} is None else getattr(_mod, {cls!r})
_real, _calls = getattr(_owner, {attr!r}), [0]
def _full(*args, **kw):
    _calls[0] += 1
    if _calls[0] == {nth}:
        path = args[{path_arg}]
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    return _real(*args, **kw)
setattr(_owner, {attr!r}, _full)
"""

# os.access says "not writable" for one folder, as it does for a user without write permission
READ_ONLY = """
_real_access = os.access
def _access(p, mode, *a, **k):
    if os.path.realpath(p) == os.path.realpath({folder!r}) and mode & os.W_OK:
        return False
    return _real_access(p, mode, *a, **k)
os.access = _access
"""


def run_cmd(script: str, *args, cwd=None, patch: str | None = None, timeout=300) -> subprocess.CompletedProcess:
    path = os.path.join(ROOT, script)
    cmd = [sys.executable, path, *args] if patch is None else [sys.executable, "-c", WRAP.format(patch=patch), path,
                                                                *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd or ROOT, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": ROOT})


def call(capfd, script: str, *args, cwd=None) -> SimpleNamespace:
    """The command's `main(argv)` in this process (no interpreter start-up: most tests use this), stdout / stderr
    captured at the file-descriptor level; an exception escaping `main` fails the test as a traceback would."""
    module = importlib.import_module(script.removesuffix(".py"))
    old = os.getcwd()
    capfd.readouterr()
    try:
        if cwd:
            os.chdir(cwd)
        code = module.main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    finally:
        os.chdir(old)
    out, err = capfd.readouterr()
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def refused(p: subprocess.CompletedProcess, *words: str) -> str:
    """The audit's classification of a clean refusal: non-zero exit, exactly one `error:` line, no traceback."""
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode != 0, f"exit 0:\n{p.stderr[-2000:]}"
    assert "Traceback" not in p.stderr + p.stdout, p.stderr[-3000:]
    assert len(errors) == 1, p.stderr[-3000:]
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def tree(path: str) -> dict:
    """{relative path: file bytes, '-> link target', or '<dir>'} of everything under `path` (links not followed)."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            if os.path.islink(full):
                out[rel] = "-> " + os.readlink(full)
            elif os.path.isdir(full):
                out[rel] = "<dir>"
            else:
                with open(full, "rb") as f:
                    out[rel] = f.read()
    return out


def leftovers(folder: str) -> list[str]:
    """Temporary files or folders a write left (ours, or the old `X.tmp` names)."""
    found = []
    for root, dirs, files in os.walk(folder):
        found += [os.path.join(root, n) for n in dirs + files
                  if n.startswith(".minisd-") or (n.endswith(".tmp") and not os.path.islink(os.path.join(root, n)))]
    return found


def plant_link(path: str, target: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.symlink(target, path)
