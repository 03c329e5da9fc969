"""Every option of `train.py` in one dataclass, `TrainConfig`, read from a TOML file and command-line flags.

Precedence, lowest first: the dataclass defaults < the run's saved config.json (with --resume) < the TOML file
(--config FILE) < command-line flags. The command line is generated from the fields (minGPT's merge-from-args
idea on a dataclass): field `min_snr_gamma` is flag `--min-snr-gamma`, a bool field gets `--x / --no-x`. The
help text of each flag is the `help` metadata of its field. The resolved config is printed at start and written
to `<run dir>/config.json`, which is also what --resume reads back.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tomllib
from dataclasses import dataclass, field
from typing import Optional

CHOICES = {
    "network": ("lora", "dora", "loha", "lokr"),
    "targets": ("attn", "attn-mlp", "full"),
    "optimizer": ("adamw", "adamw8bit", "prodigy"),
    "lr_scheduler": ("constant", "cosine", "linear"),
    "mixed_precision": ("no", "bf16", "fp16"),
    "prediction": ("auto", "epsilon", "v_prediction"),
    "init": ("kaiming", "gaussian"),
    "vae_dtype": ("auto", "fp32", "fp16", "bf16"),
    "base_dtype": ("auto", "int8", "fp8"),  # more than one GPU / small GPU (issue 19)
    "noise_streams": ("auto", "batch", "sample"),
}


def opt(default, help: str):
    """A dataclass field with its flag's help text."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # --- what to train on
    data: Optional[str] = opt(None, "image folder (NAME.png + NAME.txt, metadata.jsonl, or kohya concept folders "
                                    "DIR/10_sks dog/: repeats and class tokens from the name); default: generate "
                                    "the embedded world's style dataset into the run folder")
    style: str = opt("outlined", "world style used when --data is not given (outlined, striped, dotted)")
    n_images: int = opt(400, "images generated when --data is not given")
    model: Optional[str] = opt(None, "base model: minisd folder, diffusers folder, single file or tiny-random; "
                                     "default weights/minisd-tiny if present, else tiny-random")
    out: Optional[str] = opt(None, "run folder; default runs/<timestamp>")
    resume: Optional[str] = opt(None, "continue the run in this folder from its last checkpoint")
    resolution: int = opt(0, "training resolution in pixels (0: the model's native resolution)")
    repeats: int = opt(1, "times each image is seen per epoch (times a kohya concept folder's own count)")
    random_crop: bool = opt(False, "random instead of centre crop")
    flip: float = opt(0.0, "probability of a horizontal flip")
    caption_dropout: float = opt(0.0, "probability of training on the empty caption (keeps CFG working)")
    buckets: bool = opt(False, "aspect-ratio buckets: each image at the shape nearest its own, area <= "
                               "resolution², one shape per batch (minisd/train/buckets.py)")
    bucket_step: int = opt(0, "bucket side step in px, a multiple of VAE factor x UNet down-sampling "
                              "(0: auto, 64 for SD/SDXL; needs --buckets, as do the next two)")
    bucket_min: int = opt(0, "smallest bucket side in px (0: resolution / 2)")
    bucket_max: int = opt(0, "largest bucket side in px (0: 2 x resolution)")
    cache_latents: bool = opt(False, "VAE-encode every image once before training (posterior mean, logvar; with "
                                     "--flip both orientations); not with --random-crop")
    cache_text: bool = opt(False, "encode every caption (and the empty one) once; not with --train-text-encoder")
    cache_dir: Optional[str] = opt(None, "keep the caches in this folder, reused while model, data and resolution "
                                         "match (default: in memory)")
    # --- the adapter
    network: str = opt("lora", "adapter kind: " + "|".join(CHOICES["network"]))
    rank: int = opt(8, "adapter rank (LoRA dim)")
    alpha: float = opt(8.0, "adapter alpha; the update is scaled by alpha/rank")
    targets: str = opt("attn-mlp", "UNet layers to adapt: " + "|".join(CHOICES["targets"]))
    train_text_encoder: bool = opt(False, "also put adapters into the text encoder(s)")
    init: str = opt("kaiming", "LoRA/DoRA down-matrix init: kaiming (kohya, PEFT default) | gaussian (N(0, 1/rank))")
    init_adapter: Optional[str] = opt(None, "start from this adapter file (any layout sample.py --lora reads); "
                                            "--network, --rank, --targets and --train-text-encoder must match it")
    dropout: float = opt(0.0, "LoRA/DoRA dropout on the adapter input (PEFT's lora_dropout; training only)")
    rank_dropout: float = opt(0.0, "probability of zeroing each rank channel per sample (kohya; training only)")
    module_dropout: float = opt(0.0, "probability of skipping a whole adapter for a step (kohya; training only)")
    conv_rank: Optional[int] = opt(None, "rank of the 3x3 conv adapters of --targets full (default: --rank; "
                                         "0: no adapters on 3x3 convs)")
    conv_alpha: Optional[float] = opt(None, "alpha of the 3x3 conv adapters (default: --alpha; needs --targets "
                                            "full)")
    # --- optimisation
    lr: float = opt(1e-3, "learning rate of the UNet adapters (prodigy: use 1.0)")
    te_lr: Optional[float] = opt(None, "learning rate of the text-encoder adapters (default: --lr; needs "
                                       "--train-text-encoder)")
    te1_lr: Optional[float] = opt(None, "learning rate of the first text encoder's adapters (SDXL: CLIP-L; "
                                        "default: --te-lr; needs --train-text-encoder)")
    te2_lr: Optional[float] = opt(None, "learning rate of the second text encoder's adapters (SDXL: OpenCLIP "
                                        "bigG; default: --te-lr; needs --train-text-encoder)")
    optimizer: str = opt("adamw", "|".join(CHOICES["optimizer"]))
    weight_decay: float = opt(1e-2, "AdamW weight decay")
    lr_scheduler: str = opt("constant", "|".join(CHOICES["lr_scheduler"]) + " (after the warmup)")
    warmup_steps: int = opt(0, "linear LR warmup steps")
    max_steps: int = opt(200, "optimizer steps")
    batch_size: int = opt(4, "images per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    max_grad_norm: float = opt(1.0, "gradient clipping (0: off)")
    ema_decay: float = opt(0.0, "EMA of the adapter weights, e.g. 0.999; the final files and after-grid use it, "
                                "lora_raw.safetensors keeps the raw weights (0: off)")
    ema_warmup: bool = opt(True, "EMA decay warmup min(decay, (1+s)/(10+s)), so short runs forget the initial "
                                 "adapter (minisd/train/ema.py; --no-ema-warmup needs --ema-decay)")
    # --- recipe
    prediction: str = opt("auto", "training target: auto (the model's) | epsilon | v_prediction")
    min_snr_gamma: float = opt(0.0, "Min-SNR-γ loss weighting (Hang et al. 2023; 5 is usual; 0: off)")
    noise_offset: float = opt(0.0, "noise offset (0.05-0.1 helps very dark/bright images; 0: off)")
    zero_terminal_snr: bool = opt(False, "rescale the schedule to zero terminal SNR (Lin et al. 2023)")
    input_perturbation: float = opt(0.0, "input perturbation γ: noisy input from ε + γ·ξ, target ε (Ning et al. "
                                         "2023; 0.1 is theirs; 0: off)")
    # --- precision / memory
    mixed_precision: str = opt("no", "autocast dtype: " + "|".join(CHOICES["mixed_precision"]))
    gradient_checkpointing: bool = opt(False, "recompute UNet blocks in backward (less memory, ~30%% slower)")
    cuda_graph: bool = opt(False, "record the forward + backward of a micro-batch once as a CUDA graph and replay it "
                                  "(removes the launch overhead that dominates small batches; needs CUDA, fixed "
                                  "shapes: no --buckets, no fp16, no --module-dropout; minisd/perf/graphs.py)")
    compile: bool = opt(False, "torch.compile each UNet block and the VAE encoder: Inductor fuses the norms, "
                               "activations, adds and casts around the convs and matmuls, and saves less for backward. "
                               "The first steps compile (minutes on a GPU); with --cuda-graph the fastest path")
    device: str = opt("auto", "cpu | cuda | auto")
    threads: int = opt(1, "torch CPU threads. Default 1, not torch's one per core: on a busy CPU every extra "
                          "thread stalls each op at its join (2-core VM under load: 20 steps of `python train.py` "
                          "24 s with 1 thread, 562 s with 2, the same losses); on an idle machine, up to the number "
                          "of free cores")
    vae: Optional[str] = opt(None, "replace the model's VAE weights: diffusers vae/ folder (e.g. "
                                   "sdxl-vae-fp16-fix) or single .safetensors/.ckpt VAE file")
    vae_dtype: str = opt("fp32", "VAE dtype while encoding: " + "|".join(CHOICES["vae_dtype"]) + " (auto: bf16 "
                         "under --mixed-precision bf16, else fp32. bf16 is safe - it cannot overflow as fp16 does - "
                         "and much faster on a GPU; fp16 only with an fp16-safe VAE)")
    # --- more than one GPU / small GPU (issue 19): minisd/perf/quant.py, minisd/train/fused.py, distributed.py
    base_dtype: str = opt("auto", "storage of the frozen UNet / text-encoder Linear and Conv weights: auto "
                                  "(default: the --mixed-precision dtype, else fp32) | int8 (per-channel absmax) | "
                                  "fp8 (e4m3, per-channel scale); 8-bit halves them against bf16, dequantised in "
                                  "each forward (minisd/perf/quant.py); the adapters stay fp32, the file the same")
    fused_backward: bool = opt(False, "step each trainable tensor inside the backward as soon as its gradient is "
                                      "complete and free the gradient (default off; adamw / adamw8bit; needs "
                                      "--grad-accum 1, --max-grad-norm 0, no fp16; minisd/train/fused.py)")
    noise_streams: str = opt("auto", "where a step's noise and timesteps come from: batch (one stream for the whole "
                                     "batch) | sample (one per sample, keyed by its data position: N processes of "
                                     "batch B draw what one of batch N*B does) | auto (the default: sample under "
                                     "torchrun with more than one process, else batch)")
    vae_slicing: bool = opt(False, "encode one image at a time (less VAE memory, same latents)")
    vae_tiling: bool = opt(False, "encode in overlapping tiles (large images; latents close, not equal)")
    # --- bookkeeping
    seed: int = opt(0, "seed of data order, noise, timesteps and adapter init")
    save_every: int = opt(100, "checkpoint every N steps (0: only at the end)")
    samples: bool = opt(True, "write before/after sample grids and probe scores (world runs)")
    sample_steps: int = opt(15, "sampler steps for sample grids")
    sample_cfg: float = opt(5.0, "classifier-free guidance scale of the sample grids")
    n_eval: int = opt(32, "held-out prompts scored with the probe")
    validate_every: int = opt(0, "write <run>/validation/step_N.png every N steps, same seed each time (0: off)")
    validation_prompts: Optional[str] = opt(None, "validation prompts: 'a|b|c' or a .txt file, one per line "
                                                  "(world runs: 4 held-out prompts in the style)")
    validation_steps: int = opt(15, "sampler steps of the validation images (this and --validation-prompts need "
                                    "--validate-every)")
    progress: bool = opt(True, "tqdm progress bar")
    profile: bool = opt(False, "time each stage of a step (data, VAE, text encoders, UNet, backward, optimizer); "
                               "table at the end and <run>/profile.json")
    from_scratch: bool = opt(False, "pretrain a model from scratch instead (minisd/world/pretrain.py)")
    config: Optional[str] = opt(None, "TOML file of options (flags win over it)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def public_dict(self, run_dir: str | None = None) -> dict:
        """`to_dict()` for what leaves the machine (the adapter files' metadata): no local path. A path inside the
        run folder becomes its name relative to it (the world run's `data`), any other its base name (`sd15`,
        `vae.safetensors`); the run folder itself (`out`, `resume`) is dropped. config.json keeps the real paths
        (--resume needs them)."""
        d = self.to_dict()
        run = os.path.abspath(run_dir or self.out or ".")
        paths = ["data", "model", "vae", "cache_dir", "config"]
        if d["validation_prompts"] and (d["validation_prompts"].endswith(".txt")
                                        or os.path.isfile(d["validation_prompts"])):  # a file, not 'a|b'
            paths.append("validation_prompts")
        for name in paths:
            v = d[name]
            if v is None or (name == "model" and not os.path.exists(v)):  # "tiny-random" is a name already
                continue
            full = os.path.abspath(v)
            inside = os.path.commonpath([full, run]) == run and full != run
            d[name] = os.path.relpath(full, run) if inside else os.path.basename(os.path.normpath(full))
        d["out"] = d["resume"] = None
        return d

    def validate(self) -> None:
        """Raise ValueError with a one-line message on a bad combination."""
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(self, name)!r}")
        for name in ("rank", "max_steps", "batch_size", "grad_accum", "repeats", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        for name in ("flip", "caption_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be within [0, 1]")
        if self.lr <= 0 or any(v is not None and v < 0 for v in (self.te_lr, self.te1_lr, self.te2_lr)):
            raise ValueError("learning rates must be positive")
        for name in ("dropout", "rank_dropout", "module_dropout", "ema_decay"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be within [0, 1)")
        if self.network in ("loha", "lokr") and (self.dropout > 0 or self.init != "kaiming"):
            raise ValueError(f"--dropout and --init are LoRA/DoRA options; {self.network} has --rank-dropout "
                             "and --module-dropout")
        for name in ("conv_rank", "input_perturbation", "validate_every"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
        if self.validation_steps < 1:
            raise ValueError("--validation-steps must be >= 1")
        # caches would freeze what must change per step (cache.py)
        if self.cache_latents and self.random_crop:
            raise ValueError("--cache-latents cannot be used with --random-crop: every step would see the crop "
                             "cached at the start (drop one of them)")
        if self.cache_text and self.train_text_encoder:
            raise ValueError("--cache-text cannot be used with --train-text-encoder: the text encoder's output "
                             "changes every step (drop one of them)")
        if self.cache_dir and not (self.cache_latents or self.cache_text):
            raise ValueError("--cache-dir needs --cache-latents and/or --cache-text")
        for name in ("bucket_step", "bucket_min", "bucket_max"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
        if self.bucket_min and self.bucket_max and self.bucket_min > self.bucket_max:
            raise ValueError("--bucket-min must be <= --bucket-max")
        # No flag is a silent no-op: an option that the chosen setup would ignore is refused.
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        changed = lambda *names: [n for n in names if getattr(self, n) != defaults[n]]  # noqa: E731
        needs = [("train_text_encoder", "--train-text-encoder", changed("te_lr", "te1_lr", "te2_lr")),
                 ("buckets", "--buckets", changed("bucket_step", "bucket_min", "bucket_max")),
                 ("ema_decay", "--ema-decay D", changed("ema_warmup")),
                 ("validate_every", "--validate-every N", changed("validation_prompts", "validation_steps"))]
        # 3x3 conv adapters exist only with --targets full (a run on the embedded world without --data picks
        # full itself, and train.py validates again once it has)
        if self.data is not None and self.targets != "full":
            needs.append(("targets", "--targets full", changed("conv_rank", "conv_alpha")))
        for gate, flag, given in needs:
            if given and (gate == "targets" or not getattr(self, gate)):
                names = ", ".join("--" + ("no-" if n == "ema_warmup" else "") + n.replace("_", "-") for n in given)
                raise ValueError(f"{names} would be ignored without {flag}")
        # more than one GPU / small GPU (issue 19)
        if self.fused_backward:
            for bad, why in ((self.grad_accum > 1, "--grad-accum > 1 (the update needs the sum of several backwards)"),
                             (self.max_grad_norm > 0, "--max-grad-norm > 0 (clipping needs every gradient before the "
                                                      "first update; add --max-grad-norm 0)"),
                             (self.mixed_precision == "fp16", "--mixed-precision fp16 (the grad scaler checks every "
                                                              "gradient first; use bf16)"),
                             (self.optimizer == "prodigy", "--optimizer prodigy (its step size sums over every "
                                                           "tensor; use adamw or adamw8bit)"),
                             (self.cuda_graph, "--cuda-graph")):
                if bad:
                    raise ValueError(f"--fused-backward cannot be used with {why}")
        if self.cuda_graph and self.noise_streams == "sample":
            raise ValueError("--cuda-graph cannot be used with --noise-streams sample (a recording draws from one "
                             "stream)")
        if self.cuda_graph:  # what a recorded step cannot do (minisd/perf/graphs.py); the device is checked by Trainer
            if self.buckets:
                raise ValueError("--cuda-graph needs one image shape: drop --buckets (a graph replays fixed shapes)")
            if self.mixed_precision == "fp16":
                raise ValueError("--cuda-graph does not support --mixed-precision fp16 (its grad scaler skips "
                                 "steps from the host); use bf16")
            if self.module_dropout > 0:
                raise ValueError("--cuda-graph cannot be used with --module-dropout: it decides on the host, per "
                                 "call, which adapters run, and a recording would freeze that choice")
            if self.gradient_checkpointing and (self.dropout > 0 or self.rank_dropout > 0):
                raise ValueError("--cuda-graph with --gradient-checkpointing cannot use --dropout/--rank-dropout: "
                                 "the recompute must replay the dropout masks, which a recording cannot do")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2, no usage dump
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="train.py", description="Fine-tune a LoRA / DoRA / LoHa / LoKr adapter on a folder of "
                "captioned images. With no arguments: a style LoRA on the embedded world, on the CPU.",
                argument_default=argparse.SUPPRESS)  # absent flags stay absent, so TOML values survive
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        if kind == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=f.metadata["help"])
        else:
            conv = {"int": int, "float": float}.get(kind.replace("Optional[", "").rstrip("]"), str)
            p.add_argument(flag, type=conv, metavar=f.name.upper(), help=f.metadata["help"],
                           choices=CHOICES.get(f.name))
    return p


def _merge(cfg: TrainConfig, values: dict, where: str) -> TrainConfig:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {', '.join(unknown)}")
    return dataclasses.replace(cfg, **values)


def parse_config(argv: list[str] | None = None) -> tuple[TrainConfig, dict]:
    """The resolved TrainConfig and the flags given explicitly. Raises ValueError on bad files / values."""
    flags = vars(build_parser().parse_args(argv))
    cfg = TrainConfig()
    if flags.get("resume"):
        saved = os.path.join(flags["resume"], "config.json")
        if not os.path.isfile(saved):
            raise ValueError(f"--resume {flags['resume']}: no config.json there (not a run folder)")
        with open(saved) as f:
            values = json.load(f)
        if values.get("threads") == 0:  # written before the default was 1: 0 meant torch's default then
            del values["threads"]
        cfg = _merge(cfg, values, saved)
    toml_path = flags.get("config")
    if toml_path:
        try:
            with open(toml_path, "rb") as f:
                cfg = _merge(cfg, tomllib.load(f), toml_path)
        except OSError as e:
            raise ValueError(f"{toml_path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{toml_path}: not valid TOML ({e})") from None
    cfg = _merge(cfg, flags, "command line")
    cfg.validate()
    return cfg, flags


def format_config(cfg: TrainConfig) -> str:
    """The resolved config, one `name = value` per line, for the start-of-run printout."""
    return "\n".join(f"  {k:<24}= {v!r}" for k, v in cfg.to_dict().items())
