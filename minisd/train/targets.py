"""Which UNet layers get adapters: `--targets` and `--exclude`.

    --targets attn1                 self-attention q, k, v, out of every transformer block
    --targets attn2                 cross-attention q, k, v, out (the layers that read the text; "Custom Diffusion",
                                    Kumari et al. 2023, fine-tunes only their k and v)
    --targets attn | attn-mlp | full   the presets of minisd/trainer.py (`TARGETS`)
    --targets 're:REGEX'            every nn.Linear / nn.Conv2d whose module path the expression matches
                                    (`re.search`: anchor with ^ and $ for a whole path), e.g.
                                    're:output_blocks\\.[3-5]\\..*attn2\\.to_(k|v)$'
    --exclude REGEX                 then drop the paths this expression matches (`re.search`)

Module paths are the official checkpoint keys without `.weight` (`input_blocks.1.1.transformer_blocks.0.attn1.to_q`;
README "Where each concept lives"). A selection that adapts nothing is an error naming the expression, never a
run that trains nothing. 3x3 convolutions are adapted when the targets can reach them (`full`, or a regular
expression), with --conv-rank / --conv-alpha.
"""
from __future__ import annotations

import re

import torch.nn as nn

from ..adapters import find_modules
from ..trainer import TARGETS


def check_spec(targets: str, exclude: str | None) -> None:
    """ValueError (one line) for a --targets value that is neither a preset nor a valid `re:` expression, or a bad
    --exclude expression. Called when the config is validated, before any model is loaded."""
    if targets.startswith("re:"):
        _compile(targets[3:], "--targets")
    elif targets not in TARGETS:
        raise ValueError(f"--targets must be one of {', '.join(TARGETS)} or re:REGEX, got {targets!r}")
    if exclude is not None:
        _compile(exclude, "--exclude")


def _compile(expr: str, flag: str) -> re.Pattern:
    if not expr:
        raise ValueError(f"{flag}: empty regular expression")
    try:
        return re.compile(expr)
    except re.error as e:
        raise ValueError(f"{flag} {expr!r}: not a regular expression ({e})") from None


def convs_targeted(cfg) -> bool:
    """Whether 3x3 convolutions may be selected (and so take --conv-rank): `full` and regular expressions."""
    return cfg.targets == "full" or cfg.targets.startswith("re:")


def as_patterns(expr: str) -> str:
    """A `re.search` expression as a full-match pattern (the form `adapters.find_modules` takes)."""
    return f".*(?:{expr}).*"


def unet_targets(cfg, unet: nn.Module) -> tuple[list[str], list[str]]:
    """(targets, exclude) pattern lists for `adapters.inject` on `unet`. ValueError when the regular expression, or
    what --exclude leaves of the selection, matches no Linear / Conv2d layer of this UNet."""
    check_spec(cfg.targets, cfg.exclude)
    if cfg.targets.startswith("re:"):
        targets = [as_patterns(cfg.targets[3:])]
    else:
        targets = list(TARGETS[cfg.targets])
    exclude = [as_patterns(cfg.exclude)] if cfg.exclude else []
    if cfg.targets.startswith("re:") and not find_modules(unet, targets):
        raise ValueError(f"--targets {cfg.targets!r} matches no Linear / Conv2d layer of the UNet (paths look like "
                         "input_blocks.1.1.transformer_blocks.0.attn1.to_q)")
    if exclude and not find_modules(unet, targets, exclude):
        raise ValueError(f"--exclude {cfg.exclude!r} leaves none of the --targets {cfg.targets!r} layers")
    return targets, exclude


def selected(cfg, unet: nn.Module) -> list[str]:
    """The module paths `--targets` / `--exclude` select in `unet` (before 3x3 convs are dropped for conv_rank 0)."""
    return find_modules(unet, *unet_targets(cfg, unet))
