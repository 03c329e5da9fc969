"""Every option of `train.py` in one dataclass, `TrainConfig`: its fields (each with its flag's help text), the
allowed values (`CHOICES`), and the checks of how options combine (`validate`; `given` / `changed`: an option typed
at its default value still counts as set, so a flag the setup would ignore is refused, never a silent no-op).

The command line, the TOML file and the resumed run's config.json are read into it by cli.py (`parse_config`);
values.py checks each value on its own. The resolved config is printed at start and written to
`<run dir>/config.json` (`to_dict`), which is also what --resume reads back; `public_dict` is the same without local
paths, for the adapter files' metadata.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional

from .methods import validate_methods

CHOICES = {
    "network": ("lora", "dora", "loha", "lokr"),
    "optimizer": ("adamw", "adamw8bit", "prodigy"),
    "lr_scheduler": ("constant", "cosine", "linear"),
    "mixed_precision": ("no", "bf16", "fp16"),
    "prediction": ("auto", "epsilon", "v_prediction"),
    "init": ("kaiming", "gaussian"),
    "vae_dtype": ("auto", "fp32", "fp16", "bf16"),
    "distill": (None, "small", "tiny"),  # knowledge distillation recipes (minisd/train/distill.py)
    "distill_train": ("full", "adapters"),  # what of the student trains (distill_loop.py)
    "base_dtype": ("auto", "int8", "fp8"),  # more than one GPU / small GPU (issue 19)
    "noise_streams": ("auto", "batch", "sample"),
    # issue 17: training methods besides the adapters (textual inversion, hypernetworks)
    "method": ("lora", "full", "ti", "hypernetwork"),  # full.py, textual_inversion.py, hypernetwork.py
    "hn_activation": ("linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "gelu", "silu", "mish",
                      "softsign", "hardswish", "prelu", "selu"),
    "hn_init": ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal"),
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
    # safe by default (minisd/formats/safe_write.py, minisd/train/run_folder.py): an existing --out is refused
    overwrite: bool = opt(False, "replace an existing --out that is an earlier run folder holding only what train.py "
                                 "writes (never one holding --data, --model or the working directory); the old run "
                                 "is removed only once the new one has started (default: refuse an existing --out)")
    resolution: int = opt(0, "training resolution in pixels, a multiple of VAE factor x UNet down-sampling (64 for "
                              "SD/SDXL; 0: the model's native resolution)")
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
    targets: str = opt("attn-mlp", "UNet layers to adapt (default attn-mlp): attn1 (self-attention q,k,v,out) | "
                                   "attn2 (cross-attention) | attn (both) | attn-mlp (+ ff, proj_in/out) | full (+ ResBlock and resampling "
                                   "convs) | re:REGEX (every Linear/Conv2d whose module path the expression matches, "
                                   "re.search; minisd/train/targets.py)")
    exclude: Optional[str] = opt(None, "REGEX: leave out the module paths it matches (re.search), after --targets; "
                                       "a target set left empty is an error")
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
    # --- issue 17: the method. lora: the adapter above (--network); full, ti, hypernetwork: see below
    method: str = opt("lora", "what trains: lora (the --network adapter, lora / dora / loha / lokr, on a frozen "
                              "base; default) | full (every UNet weight, with --train-text-encoder the text "
                              "encoder(s) too; writes model/ and model.safetensors; minisd/train/full.py) | ti "
                              "(textual inversion: new token vectors only, minisd/train/textual_inversion.py) | "
                              "hypernetwork (A1111's MLPs on the keys' and values' inputs, "
                              "minisd/adapters/hypernetwork.py). Without --data, ti learns the world's subject "
                              "(captions '<token> emblem'), hypernetwork the --style")
    ti_token: str = opt("<sks>", "textual inversion: the new token, written in the captions (default <sks>)")
    ti_vectors: int = opt(1, "textual inversion: vectors per token, a token of n vectors is n new ids (default 1)")
    ti_init: str = opt("circle", "textual inversion: word whose token embedding(s) initialise the vectors (a word of "
                                 "several tokens spreads over the vectors, A1111's rule; default circle)")
    ti_norm_weight: float = opt(0.0, "textual inversion: weight λ of the norm regulariser λ·mean_i (|v_i| - μ)², μ = "
                                     "the vocabulary's mean embedding norm, per text encoder (default 0: off)")
    hn_sizes: Optional[str] = opt(None, "hypernetwork: key/value input widths that get MLPs, e.g. '768,320,640,1280' "
                                        "(A1111's enable sizes; a block width also hits self-attention, as there); "
                                        "default: the model's context width")
    hn_layers: str = opt("1,2,1", "hypernetwork: layer structure, widths as multiples of the input width (first and "
                                  "last 1; default 1,2,1)")
    hn_activation: str = opt("linear", "hypernetwork: activation after each hidden Linear: "
                                       + "|".join(CHOICES["hn_activation"])
                                       + " (swish is Hardswish, as in A1111; default linear = none)")
    hn_layer_norm: bool = opt(False, "hypernetwork: LayerNorm after every Linear (default off)")
    hn_dropout: Optional[str] = opt(None, "hypernetwork: dropout structure, one probability per --hn-layers entry "
                                          "(first and last 0), e.g. '0,0.3,0'; default: none")
    hn_init: str = opt("Normal", "hypernetwork: weight init " + "|".join(CHOICES["hn_init"]) + " (Normal: "
                                 "N(0, 0.01²), biases 0; the default)")
    hn_activate_output: bool = opt(False, "hypernetwork: the activation after the last Linear too (default off)")
    # --- optimisation
    lr: float = opt(1e-3, "learning rate of what trains (UNet adapters; with --method the weights, vectors or MLPs), > 0 "
                                "(prodigy: use 1.0)")
    te_lr: Optional[float] = opt(None, "learning rate of the text-encoder adapters (default: --lr; needs "
                                       "--train-text-encoder)")
    te1_lr: Optional[float] = opt(None, "learning rate of the first text encoder's adapters (SDXL: CLIP-L; "
                                        "default: --te-lr; needs --train-text-encoder)")
    te2_lr: Optional[float] = opt(None, "learning rate of the second text encoder's adapters (SDXL: OpenCLIP "
                                        "bigG; default: --te-lr; needs --train-text-encoder and a model with two)")
    optimizer: str = opt("adamw", "|".join(CHOICES["optimizer"]))
    weight_decay: float = opt(1e-2, "AdamW weight decay")
    lr_scheduler: str = opt("constant", "|".join(CHOICES["lr_scheduler"]) + " (after the warmup)")
    warmup_steps: int = opt(0, "linear LR warmup steps (>= 0)")
    max_steps: int = opt(200, "optimizer steps")
    batch_size: int = opt(4, "images per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    max_grad_norm: float = opt(1.0, "gradient clipping, >= 0 (0: off)")
    ema_decay: float = opt(0.0, "EMA of the adapter weights, e.g. 0.999; the final files and after-grid use it, "
                                "lora_raw.safetensors keeps the raw weights (0: off)")
    ema_warmup: bool = opt(True, "EMA decay warmup min(decay, (1+s)/(10+s)), so short runs forget the initial "
                                 "adapter (minisd/train/ema.py; --no-ema-warmup needs --ema-decay)")
    # --- recipe
    prediction: str = opt("auto", "training target: auto (the model's) | epsilon | v_prediction")
    min_snr_gamma: float = opt(0.0, "Min-SNR-γ loss weighting, >= 0 (Hang et al. 2023; 5 is usual; 0: off)")
    noise_offset: float = opt(0.0, "noise offset (0.05-0.1 helps very dark/bright images; 0: off)")
    zero_terminal_snr: bool = opt(False, "rescale the schedule to zero terminal SNR (Lin et al. 2023)")
    input_perturbation: float = opt(0.0, "input perturbation γ: noisy input from ε + γ·ξ, target ε (Ning et al. "
                                         "2023; 0.1 is theirs; 0: off)")
    # --- knowledge distillation (minisd/train/distill.py, distill_loop.py)
    distill: Optional[str] = opt(None, "distil the model's UNet (the teacher, frozen) into a block-removed student "
                                       "(trained in full or by adapters: --distill-train): small | tiny (BK-SDM / Segmind SD-Small, SD-Tiny; "
                                       "default: off, adapter training). Writes student/, student.safetensors, "
                                       "student-diffusers/")
    output_weight: float = opt(1.0, "weight of MSE(student output, teacher output) (needs --distill; BK-SDM's "
                                    "and Segmind's code: 1)")
    feature_weight: float = opt(1.0, "weight of the summed MSE of the matched block outputs (needs --distill; "
                                     "BK-SDM's and Segmind's code: 1)")
    distill_train: str = opt("full", "what of the student trains (needs --distill): full (every student weight; "
                                     "default) | adapters (the student's weights frozen, the --network adapter "
                                     "(--rank, --alpha, --targets, ...) in the student the only trainable tensors; "
                                     "writes the student with the adapters merged in, and lora.safetensors)")
    # --- precision / memory
    mixed_precision: str = opt("no", "autocast dtype: " + "|".join(CHOICES["mixed_precision"]))
    gradient_checkpointing: bool = opt(False, "recompute UNet blocks in backward (less memory, ~30%% slower)")
    cuda_graph: bool = opt(False, "record the forward + backward of a micro-batch once as a CUDA graph and replay it "
                                  "(removes the launch overhead that dominates small batches; needs CUDA, fixed "
                                  "shapes: no --buckets, no fp16, no --module-dropout, no --fused-backward; adapters "
                                  "or --method full; with --class-prompt the class batch is a second input; "
                                  "minisd/perf/graphs.py)")
    compile: bool = opt(False, "torch.compile each UNet block and the VAE encoder: Inductor fuses the norms, "
                               "activations, adds and casts around the convs and matmuls, and saves less for backward. "
                               "The first steps compile (minutes on a GPU); with --cuda-graph the fastest path")
    device: str = opt("auto", "cpu | cuda | cuda:N | mps | auto (a device this machine lacks is refused)")
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
    fused_bucket_mb: float = opt(128.0, "--fused-backward: tensors stepped by one optimizer call, in MB of fp32 "
                                        "gradient (MB * 2^18 values); at most this plus the largest tensor's "
                                        "gradient is alive (default 128: 2^25 values, one 8-bit AdamW chunk; > 0)")
    noise_streams: str = opt("auto", "where a step's noise and timesteps come from: batch (one stream for the whole "
                                     "batch) | sample (one per sample, keyed by its data position: N processes of "
                                     "batch B draw what one of batch N*B does) | auto (the default: sample under "
                                     "torchrun with more than one process, else batch)")
    vae_slicing: bool = opt(False, "encode one image at a time (less VAE memory, same latents)")
    vae_tiling: bool = opt(False, "encode in overlapping tiles (large images; latents close, not equal)")
    # --- methods (issue 17): full fine-tune, DreamBooth, held-out validation loss
    instance_prompt: Optional[str] = opt(None, "DreamBooth: every image of --data trains on this prompt (e.g. 'a sks "
                                               "emblem') instead of its caption (minisd/train/dreambooth.py)")
    class_prompt: Optional[str] = opt(None, "DreamBooth prior preservation: the class prompt (e.g. 'an emblem'); "
                                            "class images are read from --class-data or drawn by the base model")
    class_data: Optional[str] = opt(None, "folder of class images (needs --class-prompt): used as they are, or filled "
                                          "up to --num-class-images by the base model (cached, resumable)")
    num_class_images: int = opt(50, "class images for prior preservation (default 50; needs --class-prompt)")
    prior_loss_weight: float = opt(1.0, "λ of the prior-preservation term: loss = L_instance + λ·L_prior (default 1, "
                                        "the paper's; needs --class-prompt)")
    val_loss_every: int = opt(0, "held-out validation loss every N steps, fixed noise and timesteps, in loss.jsonl "
                                 "and loss.png (default 0: off; minisd/train/val_loss.py)")
    val_data: Optional[str] = opt(None, "held-out image folder of the validation loss (needs --val-loss-every)")
    val_fraction: float = opt(0.0, "hold this fraction of --data out of training for the validation loss instead "
                                   "of --val-data (default 0; needs --val-loss-every)")
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
        paths = ["data", "model", "vae", "cache_dir", "config", "class_data", "val_data"]
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

    # The options given explicitly (command line); cli.parse_config sets it. `changed` counts them as set even at their
    # default value: `--fused-bucket-mb 128` without --fused-backward is refused, not silently ignored.
    given = frozenset()

    def changed(self, *names: str) -> list[str]:
        """Those of `names` given explicitly or set away from their default (what a refusal names)."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return [n for n in names if n in self.given or getattr(self, n) != defaults[n]]

    def validate(self) -> None:
        """Raise ValueError with a one-line message on a bad combination."""
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} must be one of "
                                 f"{', '.join(a for a in allowed if a is not None)}, got {getattr(self, name)!r}")
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
        validate_methods(self)  # issue 17: full fine-tune, DreamBooth, targets, validation loss (methods.py)
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
        changed = self.changed
        needs = [("train_text_encoder", "--train-text-encoder", changed("te_lr", "te1_lr", "te2_lr")),
                 ("buckets", "--buckets", changed("bucket_step", "bucket_min", "bucket_max")),
                 ("ema_decay", "--ema-decay D", changed("ema_warmup")),
                 ("validate_every", "--validate-every N", changed("validation_prompts", "validation_steps"))]
        # 3x3 conv adapters exist only with --targets full (a run on the embedded world without --data picks
        # full itself, and train.py validates again once it has)
        if self.data is not None and self.targets != "full" and not self.targets.startswith("re:"):
            needs.append(("targets", "--targets full", changed("conv_rank", "conv_alpha")))
        for gate, flag, given in needs:
            if given and (gate == "targets" or not getattr(self, gate)):
                names = ", ".join("--" + ("no-" if n == "ema_warmup" and not self.ema_warmup else "")
                                  + n.replace("_", "-") for n in given)
                raise ValueError(f"{names} would be ignored without {flag}")
        if self.distill is None and changed("output_weight", "feature_weight"):
            raise ValueError(f"{', '.join('--' + n.replace('_', '-') for n in changed('output_weight', 'feature_weight'))}"
                             " would be ignored without --distill small|tiny")
        if self.distill is None and changed("distill_train"):
            raise ValueError("--distill-train would be ignored without --distill small|tiny")
        if self.distill is not None:  # the student trains in full or through adapters; what the step cannot do
            if self.method != "lora" or self.class_prompt or self.val_loss_every:
                raise ValueError("--distill trains a student on its own: not with --method, --class-prompt or "
                                 "--val-loss-every")
            if self.output_weight < 0 or self.feature_weight < 0:
                raise ValueError("--output-weight and --feature-weight must be >= 0")
            # --distill-train full: no adapter option means anything; adapters: the text encoders are the teacher's
            # too (shared, frozen), so only the student UNet gets adapters
            adapter = changed("network", "rank", "alpha", "targets", "exclude", "init", "init_adapter", "dropout",
                              "rank_dropout", "module_dropout", "conv_rank", "conv_alpha")
            text = changed("train_text_encoder", "te_lr", "te1_lr", "te2_lr")
            if adapter and self.distill_train == "full":
                raise ValueError(f"--{adapter[0].replace('_', '-')} is an adapter option: --distill trains the whole "
                                 "student, no adapters (add --distill-train adapters)")
            if text:
                raise ValueError(f"--{text[0].replace('_', '-')}: --distill trains the student UNet only (the text "
                                 "encoders are shared with the teacher and stay frozen)")
            for name in ("cuda_graph", "compile"):
                if getattr(self, name):
                    raise ValueError(f"--{name.replace('_', '-')} is not supported with --distill")
            if self.base_dtype != "auto":  # the student's base is merged into at the end: it stays in full precision
                raise ValueError("--base-dtype is not supported with --distill")
        # more than one GPU / small GPU (issue 19)
        if self.base_dtype != "auto" and self.method != "lora":  # it quantizes the base under adapters only
            raise ValueError(f"--base-dtype {self.base_dtype} stores the frozen base under adapters (--method lora) "
                             f"in 8 bits; --method {self.method} does not use it")
        if not (0 < self.fused_bucket_mb < float("inf")):
            raise ValueError(f"--fused-bucket-mb must be a positive number of MB, got {self.fused_bucket_mb}")
        if changed("fused_bucket_mb") and not self.fused_backward:
            raise ValueError("--fused-bucket-mb would be ignored without --fused-backward")
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
        self.validate_method(changed)
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


    def validate_method(self, changed) -> None:
        """issue 17: each method's options are refused with another method; the methods' own value checks."""
        own = {"lora": changed("network", "rank", "alpha", "targets", "train_text_encoder", "init", "init_adapter",
                               "dropout", "rank_dropout", "module_dropout", "conv_rank", "conv_alpha"),
               "ti": changed("ti_token", "ti_vectors", "ti_init", "ti_norm_weight"),
               "hypernetwork": changed("hn_sizes", "hn_layers", "hn_activation", "hn_layer_norm", "hn_dropout",
                                       "hn_init", "hn_activate_output")}
        for method, given in own.items():
            if given and method != self.method and not (method == "lora" and self.method == "full"):
                names = ", ".join("--" + n.replace("_", "-") for n in given)
                raise ValueError(f"{names} {'applies' if len(given) == 1 else 'apply'} to --method {method}, not "
                                 f"--method {self.method}")
        if self.method == "ti":
            if not self.ti_token.strip() or any(c.isspace() for c in self.ti_token):
                raise ValueError(f"--ti-token must be one word without spaces, got {self.ti_token!r}")
            if self.ti_vectors < 1:
                raise ValueError("--ti-vectors must be >= 1")
            if self.ti_norm_weight < 0:
                raise ValueError("--ti-norm-weight must be >= 0")
            if not self.ti_init.strip():
                raise ValueError("--ti-init must be a word")
            if self.cache_text:
                raise ValueError("--cache-text cannot be used with --method ti: the text encoder's output changes "
                                 "every step (drop one of them)")
        if self.method == "hypernetwork":
            parse_numbers(self.hn_layers, "--hn-layers")
            if self.hn_sizes is not None:
                parse_numbers(self.hn_sizes, "--hn-sizes", int)
            if self.hn_dropout is not None:
                parse_numbers(self.hn_dropout, "--hn-dropout")


def parse_numbers(text: str, flag: str, kind=float) -> list:
    """'1, 2, 1' -> [1.0, 2.0, 1.0]; ValueError naming the flag otherwise."""
    try:
        values = [kind(v) for v in str(text).split(",")]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if kind is int and any(v < 1 for v in values):
        raise ValueError(f"{flag} must be positive widths, got {text!r}")
    return values
