"""The option checks of the fine-tuning methods of issue 17 (`validate_methods`, called by TrainConfig.validate);
what they add to checkpoints and loss.jsonl is method_state.py.

    lora (default)      the --network adapter: LoRA / DoRA / LoHa / LoKr beside a frozen base (minisd/trainer.py, minisd/adapters/)
    --method full       every UNet weight trains (minisd/train/full.py)
    --class-prompt      DreamBooth prior preservation, with adapters or full (minisd/train/dreambooth.py)
    --val-loss-every    held-out validation loss (minisd/train/val_loss.py)
"""
from __future__ import annotations


# --help sections of the methods: title -> (fields, text) (cli.py's build_parser)
HELP_SECTIONS = {
    "target choice": (("targets", "exclude"), "Which UNet layers get adapters: a preset, attn1 / attn2, or a "
                      "regular expression over module paths (minisd/train/targets.py); a selection that adapts "
                      "nothing is an error."),
    "full fine-tune": (("method",), "--method full trains every UNet weight (fp32 master weights; with "
                       "--train-text-encoder the text encoders too) with the usual memory tools (--optimizer "
                       "adamw8bit, --gradient-checkpointing, --mixed-precision bf16, --ema-decay); prints the memory "
                       "budget at start; writes RUN/model/ and RUN/model.safetensors (minisd/train/full.py)."),
    "DreamBooth (Ruiz et al. 2022)": (("instance_prompt", "class_prompt", "class_data", "num_class_images",
                                       "prior_loss_weight"),
                                      "Identifier prompt for the instance images, and prior preservation: "
                                      "loss = L_instance + λ·L_prior on class images drawn by the base model "
                                      "(cached in --class-data, resumable) or read from it; with adapters or "
                                      "--method full; with --cuda-graph (adapters) the class batch is a "
                                      "second input of the recording (minisd/train/dreambooth.py)."),
    "held-out validation loss": (("val_loss_every", "val_data", "val_fraction"),
                                 "The loss on held-out images with fixed noise and timesteps, every N steps, "
                                 "beside the training loss in loss.jsonl and loss.png; changes no random stream "
                                 "(minisd/train/val_loss.py)."),
}

# options that only mean something for adapter layers: refused with --method full (no flag is a silent no-op)
ADAPTER_OPTIONS = ("network", "rank", "alpha", "targets", "exclude", "init", "init_adapter", "dropout",
                   "rank_dropout", "module_dropout", "conv_rank", "conv_alpha")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate_methods(cfg) -> None:
    """ValueError with a one-line message for a bad or ignored method option."""
    from .targets import check_spec
    changed = cfg.changed  # given explicitly or set away from the default (config.py)
    if cfg.method not in ("lora", "full"):
        return  # another method's own checks (the config's CHOICES name the valid ones)
    check_spec(cfg.targets, cfg.exclude)
    if cfg.method == "full":
        given = changed(*ADAPTER_OPTIONS)
        if given:
            raise ValueError(f"{', '.join(map(_flag, given))}: adapter option(s), ignored by --method full (every "
                             "UNet weight trains)")
    # DreamBooth prior preservation
    if cfg.class_prompt is None:
        given = changed("class_data", "num_class_images", "prior_loss_weight")
        if given:
            raise ValueError(f"{', '.join(map(_flag, given))} would be ignored without --class-prompt")
    else:
        if not cfg.class_prompt.strip():
            raise ValueError("--class-prompt is empty")
        if cfg.class_data is None:
            raise ValueError("--class-prompt needs --class-data DIR: the folder the class images are read from or "
                             "generated into (and reused from by later runs)")
        if cfg.num_class_images < 1:
            raise ValueError("--num-class-images must be >= 1")
        if cfg.prior_loss_weight < 0:
            raise ValueError("--prior-loss-weight must be >= 0")
        for name, why in (("cache_latents", "the caches hold the instance images only"),
                          ("cache_text", "the caches hold the instance captions only"),
                          ("buckets", "class and instance batches must share one shape")):
            if getattr(cfg, name):
                raise ValueError(f"{_flag(name)} cannot be used with --class-prompt ({why})")
    if cfg.instance_prompt is not None and not cfg.instance_prompt.strip():
        raise ValueError("--instance-prompt is empty")
    # held-out validation loss
    if not cfg.val_loss_every:
        given = changed("val_data", "val_fraction")
        if given:
            raise ValueError(f"{', '.join(map(_flag, given))} would be ignored without --val-loss-every N")
    else:
        if cfg.val_loss_every < 0:
            raise ValueError("--val-loss-every must be >= 0")
        if (cfg.val_data is None) == (cfg.val_fraction == 0):
            raise ValueError("--val-loss-every needs exactly one of --val-data DIR and --val-fraction F")
        if not 0.0 <= cfg.val_fraction < 1.0:
            raise ValueError("--val-fraction must be within (0, 1)")
