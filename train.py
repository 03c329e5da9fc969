"""Fine-tune a LoRA / DoRA / LoHa / LoKr adapter on a frozen Stable Diffusion model, or (--method full) the model
itself; DreamBooth prior preservation with --class-prompt (minisd/train/full.py, dreambooth.py).

    python train.py                                   # an "outlined" style LoRA on the embedded world, CPU, ~2.5 min
    python train.py --data DIR --model weights/sd15 --rank 16 --max-steps 2000 --mixed-precision bf16
    python train.py --config run.toml --lr 5e-4        # TOML file, flags win
    python train.py --resume runs/20260101-120000      # continue exactly where the checkpoint left off
    torchrun --nproc_per_node 4 train.py --data DIR ... # data-parallel on 4 GPUs (README "More than one GPU")
    python train.py --method ti                        # textual inversion of the world's subject ('<sks> emblem')
    python train.py --method hypernetwork              # an A1111 hypernetwork for the outlined style

Ctrl-C (SIGINT) or SIGTERM while training: the step in flight finishes, checkpoint.pt is written at that step and
one line gives the `--resume` command (also in the run folder's stopped.txt); exit code 130 / 143. A second Ctrl-C
quits at once (the previous checkpoint stays intact). minisd/train/signals.py.

Options: `python train.py --help`, or minisd/train/config.py (read from the command line by cli.py). The step is
minisd/trainer.py, the loop around it minisd/train/loop.py, what world runs add minisd/world/validation.py.
Bad flags, a bad data folder or a bad model end with one `error:` line and exit code 2, checked before the run
folder is made, so a refused run leaves nothing behind. An existing --out is refused unless --overwrite (an earlier
run folder only) or --resume; a run folder in use by another train.py is refused (minisd/train/run_folder.py).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "minisd-tiny")


# the world runs of the methods besides the style LoRA, chosen on the embedded model; flags given explicitly win.
# distill (docs/DISTILL.md): the teacher's own plain world, captions dropped 10 % of the time as in its pretraining
# (so guidance keeps working), every image encoded once. ti (issue 17): the subject, captioned '<token> emblem';
# hypernetwork: the --style (README "Textual inversion", "Hypernetworks").
DISTILL_WORLD = dict(style="plain", lr=5e-4, max_steps=300, batch_size=16, caption_dropout=0.1, cache_latents=True,
                     cache_text=True, n_images=2000)
WORLD_METHOD_DEFAULTS = {"ti": dict(lr=5e-3, max_steps=300, n_images=200),
                         "hypernetwork": dict(lr=1e-3, max_steps=300, lr_scheduler="cosine")}


def prepare(cfg, flags: dict) -> tuple[str, dict | None]:
    """Fill the defaults that depend on the machine (model, run folder, world dataset); returns the run folder,
    which is not made here (RunFolder makes it once every check has passed), and what world data to write into it
    (keyword arguments of `world.write_folder`, or None)."""
    if cfg.resume:
        return cfg.resume, None
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
    cfg.out = run_dir
    if cfg.data is not None:
        return run_dir, None
    if cfg.distill:
        defaults = DISTILL_WORLD
    elif cfg.method in WORLD_METHOD_DEFAULTS:
        defaults = WORLD_METHOD_DEFAULTS[cfg.method]
    else:
        # the world style run. A style changes how a shape is drawn, not only what the words mean, so the ResBlock
        # convs train too ("full"), with a high LR decayed by a cosine. Chosen from a sweep of 36 runs on the
        # embedded model (docs/WORLD.md): 300 steps fit the 3-minute CPU budget and reach the probe's targets.
        # A full fine-tune (--method full) changes millions of weights, not a few thousand: no adapter targets, and a
        # far smaller LR (1e-4, not tuned: bench/methods_grid.py measures the methods)
        defaults = dict(lr=3e-3, targets="full") if cfg.method == "lora" else dict(lr=1e-4)
        defaults.update(max_steps=300, lr_scheduler="cosine")
    for name, value in defaults.items():
        if name not in flags:
            setattr(cfg, name, value)
    cfg.data = os.path.join(run_dir, "data")
    cfg.validate()  # again, now that the world's defaults are in (e.g. --conv-rank needs --targets full)
    if cfg.method == "ti" and not cfg.distill:
        return run_dir, dict(subject=True, token=cfg.ti_token,
                             note=f"images of the embedded world's subject, captioned '{cfg.ti_token} emblem'")
    return run_dir, dict(style=cfg.style, note=f"'{cfg.style}' images of the embedded world")


def main(argv: list[str] | None = None) -> int:
    from minisd.train.cli import format_config, parse_config
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
    from minisd.train.distill_loop import DistillTrainer  # --distill: a frozen teacher and a block-removed student
    from minisd.train import distributed
    from minisd.world.validation import is_world_folder, sample_and_score, validation_prompts
    from minisd.formats.safe_write import WriteError, write_text
    from minisd.train.run_folder import RunFolder, preflight
    from minisd.train.signals import Stopped, raise_on_signals, signal_name
    torch.set_num_threads(cfg.threads)  # default 1, see --help
    restore_signals = raise_on_signals()  # SIGINT / SIGTERM: one line, never a traceback (signals.py)
    try:
        # torchrun: join the process group; rank 0 checks, makes and locks the run folder (and writes the world data),
        # the others get its folder and config; only rank 0 prints (minisd/train/distributed.py)
        dist = distributed.init_from_env(cfg.device)
        if cfg.distill and dist.world > 1:
            raise ValueError("--distill runs in one process for now: start it without torchrun")
        if not dist.is_main:
            sys.stdout = open(os.devnull, "w")
        with contextlib.ExitStack() as stack:
            local = {"model": None, "run": None}  # rank 0's: the preloaded model and the locked run folder

            def make_run_folder():
                run_dir, world_job = prepare(cfg, flags)
                local["model"] = preflight(cfg, run_dir, world_data=world_job is not None)  # a refusal leaves no folder
                local["run"] = stack.enter_context(RunFolder(cfg, run_dir))  # made, locked; removed if refused early
                if world_job:
                    from minisd import world
                    note = world_job.pop("note")
                    print(f"data: writing {cfg.n_images} {note} to {cfg.data}")
                    world.write_folder(cfg.data, cfg.n_images, seed=cfg.seed, split="train", **world_job)
                return run_dir, cfg

            run_dir, cfg = dist.on_main(make_run_folder)  # the other ranks get rank 0's folder and config
            print("train config:\n" + format_config(cfg), flush=True)
            kind = DistillTrainer if cfg.distill else Trainer
            trainer = kind(cfg, run_dir, prompts=validation_prompts, model=local.pop("model"))  # world: held-out prompts
            if cfg.resume:
                trainer.load_checkpoint()
                print(f"resumed {run_dir} at step {trainer.step}")
            if dist.is_main:
                write_text(os.path.join(run_dir, "config.json"), json.dumps(cfg.to_dict(), indent=2))
                local["run"].started()  # from here on the folder is kept (and a run it replaces is gone)
            world_run = cfg.samples and is_world_folder(cfg.data)
            subject = cfg.ti_token if cfg.method == "ti" else None  # issue 17: TI runs are scored on the subject
            if world_run and trainer.step == 0:
                dist.on_main(sample_and_score, trainer, "before", subject=subject)
            t0 = time.time()
            result = trainer.run()
            print(f"trained {cfg.max_steps} steps in {time.time() - t0:.1f} s; loss {result['losses'][0]:.4f} -> "
                  f"{sum(result['losses'][-10:]) / len(result['losses'][-10:]):.4f} (mean of the last 10)")
            if world_run:
                dist.on_main(sample_and_score, trainer, "after", subject=subject)
        if cfg.distill:
            print(f"wrote the student: {result['student']} (minisd), {result['single_file']} (official single file), "
                  f"{result['diffusers']} (diffusers), "
                  + (f"{result['lora']} (its adapters, merged into those; minisd format), " if "lora" in result
                     else "")  # --distill-train adapters
                  + f"{os.path.join(run_dir, 'loss.png')}, config.json, checkpoint.pt")
        elif "files" in result:  # --method ti / hypernetwork (issue 17)
            print(f"wrote {result['files']}; {os.path.join(run_dir, 'loss.png')}, config.json, checkpoint.pt")
        elif "model" in result:  # --method full
            print(f"wrote {result['model']} (minisd folder), {result['single_file']} (official single file: "
                  f"A1111 / ComfyUI), {os.path.join(run_dir, 'loss.png')}, config.json, checkpoint.pt")
        else:
            print(f"wrote {result['lora']} (minisd), {result['kohya']} (kohya: A1111 / ComfyUI), "
                  + (f"{result['diffusers']} (diffusers / PEFT), " if "diffusers" in result else "")
                  + (f"both with EMA weights, {result['lora_raw']} (raw weights), " if "lora_raw" in result else "")
                  + f"{os.path.join(run_dir, 'loss.png')}, config.json, checkpoint.pt")
    except (ValueError, DataError, ModelError, TrainError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:  # a signal during the steps: checkpoint at e.step, the --resume command (and stopped.txt)
        print(str(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:  # a signal before the steps began or after they ended
        signum = getattr(e, "signum", 2)
        print(f"error: stopped by {signal_name(signum)} outside the training steps (a run folder with checkpoint.pt "
              "continues with --resume)", file=sys.stderr)
        return 128 + signum
    finally:
        restore_signals()
    return 0


if __name__ == "__main__":
    sys.exit(main())
