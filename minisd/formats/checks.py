"""Values that enter from outside, checked where they enter: flag values, devices, image sizes, weights, JSON.

Every check raises ValueError with one line that names the flag or the file and field, so the commands print
`error: ...` and exit 2 before any model is built or any file written:

    number(name, v, ...)      finite (no NaN / Inf), within a range; `--cfg nan` would draw a black picture
    check_device(name)        a device torch knows and this machine has (`--device cuda` on a CPU-only build)
    check_size(...)           --width / --height: positive multiples of the latent factor, and small enough that
                              decoding fits in memory (estimated: the VAE decoder's full-resolution activations)
    read_json(path, what)     a JSON object from a regular file, one line for every failure (deep nesting too)
    scheduler_keys(d, where)  scheduler-config keys minisd would ignore although they change the sampling
Weights are checked where they are loaded (model.load_strict: floating point, finite), model configs by
config.check_config, images by images.read_image, a run's options by train/values.py.
"""
from __future__ import annotations

import json
import math
import os

import torch

from .images import open_regular


def number(name: str, value, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           hi_open: bool = False, integer: bool = False):
    """`value` if it is a finite number in the range (lo, hi: bounds, open or closed), else ValueError naming
    `name`. A bool is not a number here (TOML `max_steps = true` would otherwise be 1)."""
    kind = "a whole number" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ValueError(f"{name} must be {kind}, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if lo is not None and (value <= lo if lo_open else value < lo) or \
            hi is not None and (value >= hi if hi_open else value > hi):
        left = "any" if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
        right = "any" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
        if hi is None:
            rule = f"> {lo:g}" if lo_open else f">= {lo:g}"
        elif lo is None:
            rule = f"< {hi:g}" if hi_open else f"<= {hi:g}"
        else:
            rule = f"within {left}, {right}"
        raise ValueError(f"{name} must be {rule}, got {value:g}")
    return value


def check_device(name: str) -> str:
    """A device string torch parses and this machine has: cpu, cuda, cuda:N (N < the GPU count), mps."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"--device {name!r}: not a device (cpu, cuda, cuda:N, mps)") from None
    if dev.type == "cpu":
        return name
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU available here (torch {torch.__version__}"
                             f"{'' if torch.version.cuda else ', built without CUDA'}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
        return name
    if dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"--device {name}: MPS is not available here; use --device cpu")
        return name
    raise ValueError(f"--device {name}: minisd runs on cpu, cuda or mps")


def available_memory(device: str) -> int:
    """Bytes free for tensors on `device`: the GPU's free memory, or the host's MemAvailable (Linux) / total."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: do not refuse


def decode_bytes(vae_cfg, width: int, height: int, batch: int, bytes_per_value: int = 4) -> int:
    """A lower bound on the peak memory of decoding `batch` images of width x height: at the decoder's last level
    a ResBlock holds its input, its output and one intermediate of ch·ch_mult[0] channels, and the upsampled input
    of ch·ch_mult[1] channels, all at full resolution (SD1 512 px: 0.5 GiB in fp32; the measured peak is ~4x)."""
    c0 = vae_cfg.ch * vae_cfg.ch_mult[0]
    c1 = vae_cfg.ch * vae_cfg.ch_mult[1 if len(vae_cfg.ch_mult) > 1 else 0]
    return batch * width * height * bytes_per_value * (3 * c0 + c1)


def check_size(width: int, height: int, factor: int, vae_cfg, batch: int, device: str) -> None:
    """--width / --height: positive, multiples of the VAE factor, and a decode that fits in the device's memory."""
    for flag, v in (("--width", width), ("--height", height)):
        if v <= 0:
            raise ValueError(f"{flag} must be positive, got {v}")
        if v % factor:
            raise ValueError(f"{flag} {v}: must be a multiple of {factor} (this model's latent factor), e.g. "
                             f"{max(factor, v // factor * factor)}")
    need, have = decode_bytes(vae_cfg, width, height, batch), available_memory(device)
    if need > have:
        raise ValueError(f"{width}x{height} x {batch} image(s) needs at least {need / 2**30:.1f} GiB to decode on "
                         f"{device}, {have / 2**30:.1f} GiB is free: choose a smaller size or batch")


def read_json(path: str, what: str = "JSON file") -> dict:
    """The JSON object in `path`: regular file, UTF-8, valid JSON, an object at the top; ValueError otherwise.
    Nesting deeper than Python's recursion limit is refused, not a RecursionError traceback."""
    try:
        with open_regular(path) as f:
            data = json.loads(f.read().decode("utf-8"))
    except ValueError as e:  # open_regular's reasons, JSONDecodeError, UnicodeDecodeError
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise ValueError(f"{path}: not a valid {what} ({why})") from None
    except RecursionError:
        raise ValueError(f"{path}: not a valid {what} (nested too deeply)") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read the {what} ({e.strerror})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a valid {what} (a JSON {type(data).__name__}, not an object)")
    return data


# Scheduler-config keys minisd does not implement, with the values at which they change nothing (diffusers'
# defaults where those are what minisd does). Another value would be silently ignored by sampling, so it is refused
# (convert.py keeps every key for export).
NEUTRAL_SCHEDULER_KEYS = {
    "clip_sample": (False, None), "thresholding": (False, None), "rescale_betas_zero_snr": (False, None),
    "trained_betas": (None,), "use_karras_sigmas": (False, None), "use_exponential_sigmas": (False, None),
    "use_beta_sigmas": (False, None), "variance_type": ("fixed_small", None), "timestep_type": ("discrete", None),
    "final_sigmas_type": ("zero", None), "use_lu_lambdas": (False, None), "euler_at_final": (False, None),
    "lambda_min_clipped": (-math.inf, None), "sigma_min": (None,), "sigma_max": (None,),
    "use_flow_sigmas": (False, None), "invert_sigmas": (False, None), "shift_terminal": (None,),
    "use_dynamic_shifting": (False, None), "time_shift_type": ("exponential", None),
}
# Keys that only choose a diffusers sampler class's internals (which --sampler replaces), the schedule minisd
# reads, or a parameter of a feature that the keys above keep off.
KNOWN_SCHEDULER_KEYS = {"_class_name", "_diffusers_version", "skip_prk_steps", "solver_order", "algorithm_type",
                        "solver_type", "lower_order_final", "interpolation_type", "timestep_spacing", "steps_offset",
                        "set_alpha_to_one", "num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                        "prediction_type", "sample_max_value", "dynamic_thresholding_ratio", "clip_sample_range",
                        "flow_shift", "rho"}


def scheduler_keys(d: dict, where: str) -> None:
    """Refuse a scheduler config whose keys ask for something minisd's samplers do not do (zero-terminal-SNR
    rescaling, thresholding, x0 clipping, trained betas, Karras sigmas by config, ...): sampling would ignore
    them silently."""
    for k, v in d.items():
        if k in KNOWN_SCHEDULER_KEYS or k.startswith("_"):  # "_use_default_values": diffusers' bookkeeping
            continue
        if k not in NEUTRAL_SCHEDULER_KEYS:
            raise ValueError(f"{where}: unknown scheduler key {k!r}: refused rather than ignored")
        if v not in NEUTRAL_SCHEDULER_KEYS[k]:
            hint = " (sample.py --karras does this)" if k == "use_karras_sigmas" else ""
            raise ValueError(f"{where}: {k} = {json.dumps(v)[:60]} is not implemented by minisd's samplers{hint}: "
                             "refused rather than ignored")
