"""Fine-tune a LoRA / DoRA / LoHa / LoKr adapter on a frozen Stable Diffusion model.

    python train.py                                   # an "outlined" style LoRA on the embedded world, CPU, ~2.5 min
    python train.py --data DIR --model weights/sd15 --rank 16 --max-steps 2000 --mixed-precision bf16
    python train.py --config run.toml --lr 5e-4        # TOML file, flags win
    python train.py --resume runs/20260101-120000      # continue exactly where the checkpoint left off
    torchrun --nproc_per_node 4 train.py --data DIR ... # data-parallel on 4 GPUs (README "More than one GPU")

Options: `python train.py --help`, or minisd/train/config.py. The step is minisd/trainer.py, the loop around it
minisd/train/loop.py, what world runs add minisd/world/validation.py.
Bad flags, a bad data folder or a bad model end with one `error:` line and exit code 2.
"""
from __future__ import annotations

import json
import os
import sys
import time

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "minisd-tiny")


def prepare(cfg, flags: dict) -> str:
    """Fill the defaults that depend on the machine (model, run folder, world dataset); returns the run folder."""
    from minisd import world
    if cfg.resume:
        return cfg.resume
    if cfg.model is None:
        if os.path.isdir(DEFAULT_MODEL):
            cfg.model = DEFAULT_MODEL
        else:
            cfg.model = "tiny-random"
            print(f"note: {DEFAULT_MODEL} not found (not trained yet?): using the tiny-random model, whose "
                  "samples are noise; the loop, files and resume work the same")
            # its 32x32 latents make sampling slow on a CPU, and the pictures say nothing: sample little
            cfg.sample_steps = flags.get("sample_steps", 4)
            cfg.n_eval = flags.get("n_eval", 8)
    if cfg.data is not None and not os.path.isdir(cfg.data):
        from minisd.train.data import DataError
        raise DataError(f"{cfg.data}: no such data folder")
    run_dir = cfg.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(run_dir, exist_ok=True)
    cfg.out = run_dir
    if cfg.data is None:
        # the world style run. A style changes how a shape is drawn, not only what the words mean, so the ResBlock
        # convs train too ("full"), with a high LR decayed by a cosine. Chosen from a sweep of 36 runs on the
        # embedded model (docs/WORLD.md): 300 steps fit the 3-minute CPU budget and reach the probe's targets.
        for name, value in (("targets", "full"), ("lr", 3e-3), ("max_steps", 300), ("lr_scheduler", "cosine")):
            if name not in flags:
                setattr(cfg, name, value)
        cfg.data = os.path.join(run_dir, "data")
        cfg.validate()  # again, now that the world's defaults are in (e.g. --conv-rank needs --targets full)
        print(f"data: writing {cfg.n_images} '{cfg.style}' images of the embedded world to {cfg.data}")
        world.write_folder(cfg.data, cfg.n_images, seed=cfg.seed, split="train", style=cfg.style)
    return run_dir


def main(argv: list[str] | None = None) -> int:
    from minisd.train.config import format_config, parse_config
    try:
        cfg, flags = parse_config(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.from_scratch and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print("error: --from-scratch runs in one process (pretraining under torchrun is not written)", file=sys.stderr)
        return 2
    if cfg.from_scratch:
        try:
            from minisd.world.pretrain import main as pretrain
        except ImportError:
            print("error: --from-scratch needs minisd/world/pretrain.py, which is not in this checkout", file=sys.stderr)
            return 2
        rest = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--from-scratch"]
        return pretrain(rest) or 0

    import torch
    from minisd.train.data import DataError
    from minisd.model import ModelError
    from minisd.train.loop import Trainer, TrainError
    from minisd.train import distributed
    from minisd.world.validation import is_world_folder, sample_and_score, validation_prompts
    torch.set_num_threads(cfg.threads)  # default 1, see --help
    try:
        # torchrun: join the process group; rank 0 prepares the run folder (and the world data), the others get its
        # folder and config; only rank 0 prints (minisd/train/distributed.py)
        dist = distributed.init_from_env(cfg.device)
        run_dir, cfg = dist.on_main(lambda: (prepare(cfg, flags), cfg))
        if not dist.is_main:
            sys.stdout = open(os.devnull, "w")
        print("train config:\n" + format_config(cfg), flush=True)
        trainer = Trainer(cfg, run_dir, prompts=validation_prompts)  # world runs: held-out prompts by default
        if cfg.resume:
            trainer.load_checkpoint()
            print(f"resumed {run_dir} at step {trainer.step}")
        if dist.is_main:
            with open(os.path.join(run_dir, "config.json"), "w") as f:
                json.dump(cfg.to_dict(), f, indent=2)
        world_run = cfg.samples and is_world_folder(cfg.data)
        if world_run and trainer.step == 0:
            dist.on_main(sample_and_score, trainer, "before")
        t0 = time.time()
        result = trainer.run()
        print(f"trained {cfg.max_steps} steps in {time.time() - t0:.1f} s; loss {result['losses'][0]:.4f} -> "
              f"{sum(result['losses'][-10:]) / len(result['losses'][-10:]):.4f} (mean of the last 10)")
        if world_run:
            dist.on_main(sample_and_score, trainer, "after")
        print(f"wrote {result['lora']} (minisd), {result['kohya']} (kohya: A1111 / ComfyUI), "
              + (f"{result['diffusers']} (diffusers / PEFT), " if "diffusers" in result else "")
              + (f"both with EMA weights, {result['lora_raw']} (raw weights), " if "lora_raw" in result else "")
              + f"{os.path.join(run_dir, 'loss.png')}, config.json, checkpoint.pt")
    except (ValueError, DataError, ModelError, TrainError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
