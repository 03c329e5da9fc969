"""The whole text-to-image model: UNet + VAE + text encoder(s) + tokenizers, and the minisd folder.

A minisd folder (what `convert.py` writes and `sample.py --model` reads) holds:
    config.json                 ModelConfig as JSON (family, every component config, schedule)
    unet.safetensors            state dict with official (CompVis/Stability) names
    vae.safetensors
    text_encoder.safetensors    (and text_encoder_2.safetensors for SDXL)
    tokenizer/, tokenizer_2/    vocabulary files (the shipped ones are used where absent)
    extras.safetensors          optional: source tensors minisd does not compute with (schedule
                                buffers, position_ids, ...), kept verbatim so export rebuilds the file
    source.json                 optional: where the weights came from (format, file, EMA, naming)
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.overrides import TorchFunctionMode

from .clip import CLIPTextModel, TextEncoderOutput
from .config import CLIPTextConfig, ModelConfig
from .ldmbert import LDMBert
from .tokenizer import load_tokenizer
from .unet import UNetModel
from .vae import AutoencoderKL

# The minisd folder's file names, spelled here only (formats/ and the commands import them).
CONFIG_NAME = "config.json"
UNET_FILE = "unet.safetensors"
VAE_FILE = "vae.safetensors"
EXTRAS_NAME = "extras.safetensors"
SOURCE_NAME = "source.json"


class ModelError(Exception):
    """A model file or folder that cannot be used; the message names the problem in one line."""


def text_encoder_name(i: int) -> str:
    """Component name of text encoder i (0-based): "text_encoder", "text_encoder_2", ... It is also the stem of its
    minisd file and the name of its diffusers subfolder."""
    return "text_encoder" if i == 0 else f"text_encoder_{i + 1}"


def text_encoder_file(i: int) -> str:
    return f"{text_encoder_name(i)}.safetensors"


def tokenizer_dir(i: int) -> str:
    return "tokenizer" if i == 0 else f"tokenizer_{i + 1}"


def build_text_encoder(cfg) -> nn.Module:
    return CLIPTextModel(cfg) if isinstance(cfg, CLIPTextConfig) else LDMBert(cfg)


class StableDiffusion(nn.Module):
    """Container of the three networks. Each keeps official parameter names, so a component's
    state dict is exactly the official single file's tensors with the component prefix stripped."""

    def __init__(self, cfg: ModelConfig, tokenizer_dirs: list | None = None):
        super().__init__()
        self.cfg = cfg
        self.unet = UNetModel(cfg.unet)
        self.vae = AutoencoderKL(cfg.vae)
        self.text_encoders = nn.ModuleList([build_text_encoder(t) for t in cfg.text_encoders])
        dirs = tokenizer_dirs or [None] * len(cfg.text_encoders)
        try:
            self.tokenizers = [load_tokenizer(t, vocab_dir=d) for t, d in zip(cfg.text_encoders, dirs)]
        except ValueError as e:  # a broken vocabulary or missing special tokens: one line naming the folder
            raise ModelError(str(e)) from None

    def tokenize(self, prompts: list[str]) -> list[torch.Tensor]:
        """Prompts -> the token ids of each text encoder [(B, T), ...], each with its own tokenizer."""
        return [tok(prompts) for tok in self.tokenizers]

    def encode_text(self, ids: list[torch.Tensor]) -> TextEncoderOutput:
        """Token ids of each encoder [(B, T), ...] -> context (B, T, D) for cross-attention, pooled (B, P) or None.

        One encoder (SD1, SD2, LDM): its hidden states. SDXL: both encoders' hidden states side by side
        (D = 768 + 1280), as the official SDXL conditioner concatenates its embedders' outputs, and the pooled
        vector of the last encoder that has one (the projected OpenCLIP bigG)."""
        hidden, pooled = [], None
        for x, te in zip(ids, self.text_encoders):
            out = te(x)
            hidden.append(out.hidden)
            pooled = out.pooled if out.pooled is not None else pooled
        return TextEncoderOutput(torch.cat(hidden, dim=-1), pooled)                   # (B, T, D), (B, P)

    @property
    def vae_scale(self) -> int:
        """Pixels per latent pixel: every VAE level but the last halves the resolution."""
        return 2 ** (len(self.cfg.vae.ch_mult) - 1)

    def component_state_dicts(self) -> dict:
        """{file name: state dict} of what a minisd folder stores."""
        files = {UNET_FILE: self.unet.state_dict(), VAE_FILE: self.vae.state_dict()}
        for i, te in enumerate(self.text_encoders):
            files[text_encoder_file(i)] = te.state_dict()
        return files

    def load_components(self, files: dict, strict: bool = True) -> None:
        """Load {file name: state dict} (as `component_state_dicts` names them), shapes checked."""
        modules = {UNET_FILE: self.unet, VAE_FILE: self.vae}
        modules.update({text_encoder_file(i): te for i, te in enumerate(self.text_encoders)})
        for name, module in modules.items():
            if name not in files:
                raise ModelError(f"missing component {name}")
            load_strict(module, files[name], name)


class _SkipMetaInit(TorchFunctionMode):
    """Turns the in-place initialisers of torch.nn.init (normal_, kaiming_uniform_, zeros_, ...) into no-ops
    on meta tensors; everything else runs as usual."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init" and func.__name__.endswith("_"):
            tensor = args[0] if args else kwargs["tensor"]
            if tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


@contextlib.contextmanager
def empty_weights():
    """Build modules whose weights are about to be loaded: every parameter on the meta device (no memory) and no
    initialiser run (a meta tensor has no values to fill). Skipping them is not only tidy: the first normal_ on
    a meta tensor (nn.Embedding's init, i.e. every text encoder) runs through a torch._refs decomposition that
    imports torch._dynamo, about 3 s on a 2-core CPU, most of `python sample.py`'s start-up before this."""
    with torch.device("meta"), _SkipMetaInit():
        yield


def load_strict(module: nn.Module, sd: dict, what: str) -> None:
    """`load_state_dict(strict=True)` with a one-line error that names the first offending keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
             if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    for label, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
        if names:
            more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
            raise ModelError(f"{what}: {label} tensors: {', '.join(names[:3])}{more}")
    # a weight file is input: integers where weights belong, or NaN / Inf values (which draw black pictures)
    for k, v in sd.items():
        if own[k].is_floating_point() and not v.is_floating_point():
            raise ModelError(f"{what}: tensor {k} holds {str(v.dtype).replace('torch.', '')} values, not "
                             "floating-point weights")
        # one fp32 sum per tensor (NaN / Inf propagate): ~10x faster than isfinite().all(); counted only on failure
        if v.is_floating_point() and not v.is_meta and v.numel() and not bool(v.sum(dtype=torch.float32).isfinite()):
            bad = int((~torch.isfinite(v)).sum())
            raise ModelError(f"{what}: tensor {k} holds {bad} NaN/Inf value(s)" if bad else
                             f"{what}: tensor {k} holds values so large that their sum overflows (not weights)")
    module.load_state_dict(sd, strict=True, assign=True)
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:  # a non-persistent buffer of a module built on the meta device was never filled
        raise RuntimeError(f"{what}: tensors left on the meta device: {left[:3]}")


def write_model_files(model: StableDiffusion, folder: str, dtype: torch.dtype | None = None,
                      metadata: dict | None = None, extras: dict | None = None, source: dict | None = None) -> None:
    """Write the files of a minisd folder into `folder` (an empty folder of the caller's)."""
    for name, sd in model.component_state_dicts().items():
        sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
              for k, v in sd.items()}
        save_file(sd, os.path.join(folder, name), metadata={"format": "pt", **(metadata or {})})
    if extras:
        save_file({k: v.contiguous() for k, v in extras.items()}, os.path.join(folder, EXTRAS_NAME))
    if source:
        with open(os.path.join(folder, SOURCE_NAME), "w") as f:
            json.dump(source, f, indent=2)
    for i, tok in enumerate(model.tokenizers):
        tok.save(os.path.join(folder, tokenizer_dir(i)))
    with open(os.path.join(folder, CONFIG_NAME), "w") as f:
        json.dump(model.cfg.to_dict(), f, indent=2)


def save_model(model: StableDiffusion, out: str, dtype: torch.dtype | None = None,
               metadata: dict | None = None, extras: dict | None = None, source: dict | None = None) -> None:
    """Write a minisd folder at `out`, which must not exist (or be an empty folder): into a fresh temporary sibling
    (a new random name, created exclusively), renamed into place at the end. An interrupted run never leaves a
    half-written model, and nothing at `out` is ever replaced: the rename fails on a file or a non-empty folder.
    (convert.py --overwrite replaces an earlier minisd folder through formats/safe_write.py, which checks what.)"""
    out = os.path.abspath(out)
    try:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".minisd-tmp-", dir=os.path.dirname(out))
    except OSError as e:
        raise ModelError(f"{out}: cannot write there ({e.strerror})") from None
    try:
        write_model_files(model, tmp, dtype, metadata, extras, source)
        os.rename(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(f"{out}: not written ({e.strerror}); nothing there was replaced") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_minisd_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_NAME)) and os.path.isfile(
        os.path.join(path, UNET_FILE))


def load_minisd_folder(path: str) -> StableDiffusion:
    try:
        with open(os.path.join(path, CONFIG_NAME)) as f:
            cfg = ModelConfig.from_dict(json.load(f))
    except RecursionError:
        raise ModelError(f"{path}/{CONFIG_NAME}: not a valid minisd config (nested too deeply)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{path}/{CONFIG_NAME}: not a valid minisd config ({e})") from None
    dirs = [os.path.join(path, tokenizer_dir(i)) for i in range(len(cfg.text_encoders))]
    dirs = [d if os.path.isdir(d) else None for d in dirs]
    with empty_weights():
        model = StableDiffusion(cfg, tokenizer_dirs=dirs)
    files = {}
    for name in model.component_state_dicts():
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            raise ModelError(f"{path}: missing component {name}")
        files[name] = read_safetensors(p)
    try:
        model.load_components(files)
    except ModelError as e:  # name the folder: "weights/x/unet.safetensors: tensor ... holds NaN"
        raise ModelError(f"{os.path.join(path, str(e))}") from None
    return model


def read_safetensors(path: str) -> dict:
    """Read a .safetensors file; a truncated or foreign file becomes a one-line ModelError."""
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises several error types for damaged headers
        raise ModelError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


def read_extras(path: str) -> tuple[dict, dict]:
    """(kept source tensors, source.json) of a minisd folder; empty where absent."""
    extras, source = {}, {}
    if os.path.isfile(os.path.join(path, EXTRAS_NAME)):
        extras = read_safetensors(os.path.join(path, EXTRAS_NAME))
    if os.path.isfile(os.path.join(path, SOURCE_NAME)):
        with open(os.path.join(path, SOURCE_NAME)) as f:
            source = json.load(f)
    return extras, source
