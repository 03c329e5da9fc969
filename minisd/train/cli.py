"""The command line of `train.py`: flags generated from `TrainConfig`'s fields, merged with a TOML file and a resumed
run's config.json into one checked `TrainConfig`, and the start-of-run printout of it.

Precedence, lowest first: the dataclass defaults < the run's saved config.json (with --resume) < the TOML file
(--config FILE) < command-line flags. The command line is generated from the fields (minGPT's merge-from-args
idea on a dataclass): field `min_snr_gamma` is flag `--min-snr-gamma`, a bool field gets `--x / --no-x`. The
help text of each flag is the `help` metadata of its field; the method flags get --help sections of their own. A bad
flag is one `error: ...` line and exit code 2 (`_Parser`). Every value is checked where it enters, whatever its
source (values.py: types, finite numbers, ranges, the device; a resume that would change the checkpoint's meaning is
refused before anything is written); how the options combine is `TrainConfig.validate` (config.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tomllib

from ..formats.checks import read_json
from ..formats.images import read_text_file
from .config import CHOICES, TrainConfig
from .methods import HELP_SECTIONS
from .values import check_resume, check_type, validate_values


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2, no usage dump
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)


METHOD_HELP = {  # issue 17: the --help sections of the methods besides the adapters
    "ti": "Gal et al. 2022, 'An Image is Worth One Word': only the new token's vectors train (every other tensor, "
          "the rest of the embedding table included, stays as loaded). SD1, SD2, SDXL (one set per encoder); not "
          "LDM-256. Writes embedding.safetensors (A1111 / kohya) and learned_embeds.safetensors (diffusers). "
          "Without --data: the embedded world's subject, 200 images, lr 5e-3, 300 steps. "
          "Example: python train.py --method ti --ti-token '<sks>' --ti-vectors 1 --ti-init circle; then "
          "python sample.py 'a small <sks> emblem at the center on a black background' --embedding "
          "RUN/embedding.safetensors:'<sks>'",
    "hypernetwork": "NovelAI's method as AUTOMATIC1111 defines it (modules/hypernetworks/hypernetwork.py): per "
                    "width, two MLPs rewrite the inputs of the attention keys and values, c + MLP(c); only the MLPs "
                    "train. Writes hypernetwork.safetensors (A1111's tensors, key layout in "
                    "minisd/adapters/hypernetwork.py). Without --data: the --style world run, lr 1e-3 cosine, 300 "
                    "steps. Example: python train.py --method hypernetwork --hn-layers 1,2,1 --hn-activation relu; "
                    "then python sample.py PROMPT --hypernetwork RUN/hypernetwork.safetensors:0.8",
}


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="train.py", description="Fine-tune a LoRA / DoRA / LoHa / LoKr adapter (or, with --method, "
                "the model itself, a textual inversion or a hypernetwork; DreamBooth with --class-prompt) on a folder "
                "of captioned images. With no arguments: a style LoRA on the embedded world, on the CPU.",
                argument_default=argparse.SUPPRESS,  # absent flags stay absent, so TOML values survive
                # stopping (minisd/train/signals.py)
                epilog="Ctrl-C (SIGINT) or SIGTERM: the step in flight finishes, checkpoint.pt is written at that "
                       "step, and one line gives the command that resumes exactly (also in RUN/stopped.txt); exit "
                       "code 130 / 143. A second Ctrl-C quits at once, the previous checkpoint intact.")
    # issue 17: each method's flags under a --help section of their own (methods.py HELP_SECTIONS, METHOD_HELP)
    fields = dataclasses.fields(TrainConfig)
    groups = {**HELP_SECTIONS,
              "textual inversion (--method ti)": (tuple(f.name for f in fields if f.name.startswith("ti_")),
                                                  METHOD_HELP["ti"]),
              "hypernetwork (--method hypernetwork)": (tuple(f.name for f in fields if f.name.startswith("hn_")),
                                                       METHOD_HELP["hypernetwork"])}
    sections = {}
    for f in fields:
        flag = "--" + f.name.replace("_", "-")
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        title = next((t for t, (names, _) in groups.items() if f.name in names), None)
        if title is not None and title not in sections:
            sections[title] = p.add_argument_group(title, groups[title][1])
        where = sections.get(title, p)
        if kind == "bool":
            where.add_argument(flag, action=argparse.BooleanOptionalAction, help=f.metadata["help"])
        else:
            conv = {"int": int, "float": float}.get(kind.replace("Optional[", "").rstrip("]"), str)
            where.add_argument(flag, type=conv, metavar=f.name.upper(), help=f.metadata["help"],
                               choices=[c for c in CHOICES[f.name] if c is not None] if f.name in CHOICES else None)
    return p


def _merge(cfg: TrainConfig, values: dict, where: str) -> TrainConfig:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {', '.join(unknown)}")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name, v in values.items():  # a TOML or config.json value is input: of its field's type (values.py)
        check_type(fields[name], v, where)
    return dataclasses.replace(cfg, **values)


def parse_config(argv: list[str] | None = None) -> tuple[TrainConfig, dict]:
    """The resolved TrainConfig and the flags given explicitly. Raises ValueError on bad files / values."""
    flags = vars(build_parser().parse_args(argv))
    cfg = TrainConfig()
    saved_cfg, given = None, set(flags)
    if flags.get("resume"):
        saved = os.path.join(flags["resume"], "config.json")
        if not os.path.isfile(saved):
            raise ValueError(f"--resume {flags['resume']}: no config.json there (not a run folder)")
        values = read_json(saved, "run config")
        if values.get("threads") == 0:  # written before the default was 1: 0 meant torch's default then
            del values["threads"]
        values.pop("overwrite", None)  # how that run's folder was made, not an option of this resume
        cfg = saved_cfg = _merge(cfg, values, saved)
    toml_path = flags.get("config")
    if toml_path:
        try:
            text = read_text_file(toml_path)
        except ValueError as e:
            raise ValueError(f"{toml_path}: {e}") from None
        try:
            values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{toml_path}: not valid TOML ({e})") from None
        except RecursionError:
            raise ValueError(f"{toml_path}: not valid TOML (nested too deeply)") from None
        cfg = _merge(cfg, values, toml_path)
        given |= {k.replace("-", "_") for k in values}
    cfg = _merge(cfg, flags, "command line")
    cfg.given = frozenset(flags) - {"resume", "config"}
    cfg.validate()
    validate_values(cfg)
    if saved_cfg is not None:  # before anything is written: nothing in the run folder changes if this refuses
        check_resume(saved_cfg, cfg, flags["resume"], given)
    return cfg, flags


def format_config(cfg: TrainConfig) -> str:
    """The resolved config, one `name = value` per line, for the start-of-run printout."""
    return "\n".join(f"  {k:<24}= {v!r}" for k, v in cfg.to_dict().items())
