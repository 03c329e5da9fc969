"""The folder is the architecture diagram; these checks keep it true. Imports are read with `ast` (no module is
executed), at module level and inside functions alike, relative ones resolved:

  * no import cycles among minisd modules;
  * chapters (the reading path, flat in minisd/) import only chapters;
  * perf/ (speed and memory tricks, applied from outside) imports only chapters;
  * only the commands (train.py, sample.py, convert.py), tools/, bench/ and minisd/world/ itself import minisd.world.

An import of a package's submodule (`from .keys_unet import x`, `from minisd.perf import graphs`) counts as an import of
that submodule; an import of a name from a package (`from . import DIFFUSERS_WEIGHTS`) as one of the package.
"""
import ast
import os

from conftest import ROOT

PKG = os.path.join(ROOT, "minisd")
CHAPTERS = ("config", "tokenizer", "clip", "ldmbert", "vae", "attention", "unet", "model", "schedule", "samplers",
            "pipeline", "lora", "trainer")
COMMANDS = ("train.py", "sample.py", "convert.py")


def module_files() -> dict[str, str]:
    """{dotted module name: path} of every .py file under minisd/ (a package is its __init__)."""
    out = {}
    for folder, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(folder, f)
    return out


MODULES = module_files()


def imported(path: str, module: str | None) -> set[str]:
    """The minisd modules a file imports. `module` is the file's dotted name (None outside the package)."""
    is_pkg = path.endswith("__init__.py")
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the file's package, `level - 1` packages up
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            # `from X import y`: the submodule X.y where there is one, else X itself
            names = [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names]
        else:
            continue
        for name in names:
            # `import minisd.a.b` imports minisd.a.b (its packages' __init__ run first, which a cycle check need
            # not follow: Python resolves a package's submodules while the package initialises)
            while name and name not in MODULES and "." in name:
                name = name.rsplit(".", 1)[0]
            if name in MODULES and name != module:
                found.add(name)
    return found


GRAPH = {m: imported(p, m) for m, p in MODULES.items()}


def is_chapter(m: str) -> bool:
    return m == "minisd" or (m.count(".") == 1 and m.split(".")[1] in CHAPTERS)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_chapter_exists_and_the_folders_are_the_appendices():
    flat = {m.split(".")[1] for m in MODULES if m.count(".") == 1 and not os.path.isdir(os.path.join(PKG, m[7:]))}
    assert flat == set(CHAPTERS), f"flat modules in minisd/ that are not chapters: {sorted(flat - set(CHAPTERS))}, " \
                                  f"chapters missing: {sorted(set(CHAPTERS) - flat)}"


def test_no_import_cycles():
    cycles = find_cycles(GRAPH)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_chapters_import_only_chapters():
    bad = [f"{m} imports {d}" for m in sorted(GRAPH) if is_chapter(m) for d in sorted(GRAPH[m]) if not is_chapter(d)]
    assert not bad, "chapters importing appendices:\n  " + "\n  ".join(bad)


def test_perf_imports_only_chapters():
    bad = [f"{m} imports {d}" for m in sorted(GRAPH) if m.startswith("minisd.perf")
           for d in sorted(GRAPH[m]) if not is_chapter(d)]
    assert not bad, "perf/ importing something other than chapters:\n  " + "\n  ".join(bad)


def test_only_commands_and_world_import_world():
    files = dict(MODULES)
    files.update({name: os.path.join(ROOT, name) for name in os.listdir(ROOT) if name.endswith(".py")})
    for folder in ("tools", "bench"):
        for name in os.listdir(os.path.join(ROOT, folder)):
            if name.endswith(".py"):
                files[f"{folder}/{name}"] = os.path.join(ROOT, folder, name)
    allowed = lambda m: m in COMMANDS or m.startswith(("tools/", "bench/", "minisd.world"))  # noqa: E731
    bad = []
    for m, path in sorted(files.items()):
        deps = GRAPH[m] if m in GRAPH else imported(path, None)
        if any(d == "minisd.world" or d.startswith("minisd.world.") for d in deps) and not allowed(m):
            bad.append(m)
    assert not bad, f"modules importing minisd.world besides the commands, tools/, bench/ and world/: {bad}"
