"""Shared by tests/test_safe_writes.py and tests/test_safe_train.py: run a command (as a process, or its `main` in this
process), judge a refusal the way the audit of issue 15 did, and snapshot folders so "nothing that was there
destroyed, nothing left" can be asserted."""
import importlib
import os
import subprocess
import sys
from types import SimpleNamespace

from conftest import ROOT


def run_cmd(script: str, *args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """The command as a real process (its own interpreter, working directory and exit code)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd or ROOT, timeout=timeout, env={**os.environ, "PYTHONPATH": ROOT})


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
