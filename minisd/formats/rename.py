"""The one strict rename every name table goes through (keys_unet, keys_vae, keys_text, single_file).

A table is a list of (source name, target name) pairs, one per tensor. Strict both ways, as the style guide asks
of a converter: every source tensor is consumed by a pair or ignored on purpose (the caller removes those first and
says why), every pair's source is present (except the ones the table declares optional, e.g. the bias-free
q/k/v of the UNet's attention or the VAE's width-changing shortcuts), so every target is filled. On failure one
KeyError (or the caller's error type) names the first few offending tensors.
"""
from __future__ import annotations

from typing import Callable, Iterable

SHOWN = 5  # offending names printed per error


def check_names(what: str, unexpected: Iterable[str] = (), missing: Iterable[str] = (), error=KeyError) -> None:
    """Raise `error` naming the first source tensors nothing consumed ("unexpected"), else the first ones a table
    needs but did not find ("missing"); do nothing when both are empty."""
    for label, names in (("unexpected (unconsumed)", list(unexpected)), ("missing", list(missing))):
        if names:
            more = f" (+{len(names) - SHOWN} more)" if len(names) > SHOWN else ""
            raise error(f"{what}: {len(names)} {label} tensors: {', '.join(names[:SHOWN])}{more}")


def strict_rename(sd: dict, pairs: Iterable[tuple[str, str]], what: str,
                  optional: Callable[[str], bool] | None = None,
                  fix: Callable[[str, str, object], object] | None = None) -> dict:
    """{target: sd[source]} for every (source, target) pair, in the order of `sd`; the tensors themselves (views
    where `fix` reshapes), never copies. `optional(source)` marks a pair whose tensor may be absent; `fix(source,
    target, tensor)` may reshape a tensor on its way. Strict as the module docstring says."""
    target_of = dict(pairs)
    check_names(what, unexpected=[k for k in sd if k not in target_of],
                missing=[s for s in target_of if s not in sd and not (optional and optional(s))])
    return {target_of[k]: (fix(k, target_of[k], v) if fix else v) for k, v in sd.items()}


def tensor_pairs(module_pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Module-name pairs -> tensor-name pairs: each module's `.weight` and `.bias` (the UNet and VAE tables are
    written per module)."""
    return [(f"{a}.{p}", f"{b}.{p}") for a, b in module_pairs for p in ("weight", "bias")]


def count_index(names: Iterable[str], pattern: str) -> int:
    r"""1 + the largest index captured by `pattern` among the names (0 if none match): how a table reads a layer or
    level count from the names themselves (e.g. r"encoder\.down_blocks\.(\d+)\.")."""
    import re
    found = [int(m.group(1)) for n in names if (m := re.match(pattern, n))]
    return max(found) + 1 if found else 0
