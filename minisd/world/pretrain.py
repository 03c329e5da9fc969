"""From-scratch pretraining of minisd-tiny on the procedural world (`minisd/world/__init__.py`): the pool, both
training phases, the time budget and the command.

Two phases, as Stable Diffusion itself was made (Rombach et al. 2022, Sec. 3):

  1. the autoencoder: x -> q(z|x) -> x̂, loss = |x − x̂|₁ + |x − x̂|₂² + β·KL(q(z|x) ‖ N(0, I)), β small so
     the latent keeps detail (SD used 1e-6 on sums; we take means and β = 1e-5 per latent element);
  2. the UNet and the text encoder together, with the diffusion loss of Ho et al. 2020, Eq. (14):
     L = ‖ε − ε_θ(√ᾱ_t·z_0 + √(1−ᾱ_t)·ε, t, τ_θ(y))‖², t ~ U{0..T−1}, z_0 = VAE latent · scale_factor.
     The text encoder τ_θ starts from random weights and learns only through the UNet's cross-attention.
     10 % of captions are replaced by "" so the model also learns p(z) and classifier-free guidance works.

Data: images are drawn from `world.sample(split="train")` with fixed seeds into a pool (rendered in worker
processes), so held-out (shape, colour, position) triples are never seen. Each image has 4 full captions and
`--partial` partial ones (`world.partial_caption`: any subset of the attributes named, 8 wordings), so the model
binds each word to its object whatever a prompt leaves out. Evaluation (the `eval` subcommand, `fidelity.py`)
samples held-out prompts, full and partial, and reads the images with the probe (`minisd/world/probe.py`); `--eval N`
probes the freshly trained model on N held-out full prompts.

    python -m minisd.world.pretrain --out weights/minisd-tiny --device cuda --minutes 8      # train
    python -m minisd.world.pretrain --vae-from DIR --init DIR --minutes 5                    # continue phase 2
    python -m minisd.world.pretrain eval --model weights/minisd-tiny --n 64 --partial 16     # probe fidelity

Shapes: B=batch, T=77 tokens, N=pool size, z = latent (B, 4, 16, 16) for a 64 px image at f = 4.
"""
from __future__ import annotations

import argparse
import copy
import math
import multiprocessing as mp
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from .. import world
from ..config import WORLD_TINY, ModelConfig
from ..formats.safe_write import MINISD, WriteError, atomic_folder, check_folder_dest
from ..model import StableDiffusion, write_model_files
from ..schedule import NoiseSchedule
from .fidelity import DEFAULT_MODEL, eval_main, probe_fidelity

DEFAULT_OUT = DEFAULT_MODEL  # weights/minisd-tiny, the shipped model, which `eval` reads by default


# ---------------------------------------------------------------------------------------------------- data

def _render_chunk(job: tuple) -> tuple[np.ndarray, list]:
    n, seed, split, style, subject = job
    pairs = world.sample(n, seed, split=split, style=style, subject=subject)
    return np.stack([np.asarray(world.render(a)) for a, _ in pairs]), [a for a, _ in pairs]


# What the autoencoder alone also sees, chunk by chunk (see `make_pool(styled=True)`)
VAE_EXTRA = [("outlined", False), ("striped", False), ("dotted", False), (None, True)]


def _worker_signals() -> None:
    """Render workers leave Ctrl-C to the parent (which ends the pool) and die quietly when it terminates them."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def make_pool(n: int, seed: int = 0, split: str = "train", workers: int = 1, chunk: int = 500,
              styled: bool = False):
    """n rendered world images as uint8 (N, 3, 64, 64) and their attributes. Chunk i uses seed
    seed·100003 + i, so the pool depends on (n, seed, chunk) only, never on the number of workers.

    styled=True renders the fine-tuning material instead, chunk i in style / subject VAE_EXTRA[i mod 4] (seeds
    offset so they differ from the plain pool's). Only the autoencoder trains on it: like SD's VAE, which was
    trained on a broad image set (OpenImages), it is a general image codec and must be able to represent stripes,
    dots and the subject, or no fine-tune of the UNet could ever draw them (a VAE trained on plain images alone
    reconstructs striped shapes as plain ones: the probe read 19 % of them as striped). The UNet and the text
    encoder never see these images or their words."""
    extra = lambda i: VAE_EXTRA[i % len(VAE_EXTRA)] if styled else (None, False)
    base = seed * 100003 + (50021 if styled else 0)
    jobs = [(min(chunk, n - s), base + i, split, *extra(i)) for i, s in enumerate(range(0, n, chunk))]
    if workers > 1:
        with mp.get_context("fork").Pool(workers, initializer=_worker_signals) as pool:
            parts = pool.map(_render_chunk, jobs)
    else:
        parts = [_render_chunk(j) for j in jobs]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts])).permute(0, 3, 1, 2).contiguous()
    return images, [a for p in parts for a in p[1]]


def caption_ids(tokenizer, attrs: list, partial: int = 0, seed: int = 0) -> torch.Tensor:
    """Token ids of each image's caption slots: (N, 4 + partial, T). Slots 0-3 are the four full templates;
    slots 4.. are partial captions (`world.partial_caption`), each a subset drawn uniformly from world.SUBSETS
    and a wording from world.PHRASINGS. Training picks a slot uniformly, so `partial` sets the mix: 12 gives
    25 % full template captions and 75 % partial ones. Captions depend on the attributes but not on the jitter,
    so the slots are drawn once per distinct (size, colour, shape, position, background) with one rng, and only
    the distinct texts are tokenized."""
    keys = [(a.size, a.colour, a.shape, a.position, a.background) for a in attrs]
    uniq = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    first = {}
    for a, k in zip(attrs, keys):
        first.setdefault(k, a)
    rng = np.random.default_rng(seed)
    texts = []
    for k in uniq:
        texts += [world.caption(first[k], t) for t in range(len(world.TEMPLATES))]
        for _ in range(partial):
            subset = world.SUBSETS[rng.integers(len(world.SUBSETS))]
            texts.append(world.partial_caption(first[k], subset, int(rng.integers(len(world.PHRASINGS)))))
    distinct = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    ids = tokenizer(list(distinct))                                             # (D, T)
    ids = ids[torch.tensor([distinct[t] for t in texts])].view(len(uniq), len(world.TEMPLATES) + partial, -1)
    return ids[torch.tensor([uniq[k] for k in keys])]                          # (N, 4 + partial, T)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [-1, 1], the VAE's input range."""
    return x.float() / 127.5 - 1.0


def lr_at(progress: float, warmup: float = 0.05) -> float:
    """Linear warm-up over the first 5 % of training, then a cosine decay to 10 % of the peak."""
    if progress < warmup:
        return progress / warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


class Budget:
    """Progress in [0, 1] as the larger of steps done / steps and seconds spent / seconds allowed, so a run can
    be capped by either; the learning-rate schedule follows it."""

    def __init__(self, steps: int, seconds: float | None):
        self.steps, self.seconds, self.t0, self.step = steps, seconds, time.time(), 0

    def progress(self) -> float:
        p = self.step / self.steps
        if self.seconds:
            p = max(p, (time.time() - self.t0) / self.seconds)
        return p


# ---------------------------------------------------------------------------------------------------- phase 1

def train_vae(model: StableDiffusion, images: torch.Tensor, steps: int, batch: int = 64, lr: float = 1e-3,
              kl_weight: float = 1e-5, seconds: float | None = None, device="cpu", log=print, seed: int = 0) -> dict:
    """Phase 1: train the autoencoder on pool images; returns the last losses."""
    vae = model.vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    amp = device.type == "cuda"
    budget, stats = Budget(steps, seconds), {}
    while budget.progress() < 1.0:
        for g in opt.param_groups:
            g["lr"] = lr * lr_at(budget.progress())
        idx = torch.randint(len(images), (batch,), generator=gen)
        x = to_unit(images[idx.to(images.device)].to(device))                 # (B, 3, 64, 64)
        # bf16 autocast for the convolutions; GroupNorm and the losses stay fp32 under autocast.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            post = vae.encode(x)
            xr = vae.decode(post.sample()).float()
        l1, l2 = (xr - x).abs().mean(), ((xr - x) ** 2).mean()
        # KL(N(μ, σ²) ‖ N(0, 1)) per latent element, Kingma & Welling 2014, Appendix B.
        kl = 0.5 * (post.mean.float() ** 2 + post.var.float() - 1.0 - post.logvar.float()).mean()
        loss = l1 + l2 + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        budget.step += 1
        if budget.step % 100 == 0 or budget.step == 1:
            stats = {"step": budget.step, "l1": l1.item(), "l2": l2.item(), "kl": kl.item()}
            log(f"vae step {budget.step:5d}  l1 {stats['l1']:.4f}  l2 {stats['l2']:.5f}  kl {stats['kl']:.2f}  "
                f"{time.time() - budget.t0:.0f}s")
    stats = {"steps": budget.step, "seconds": time.time() - budget.t0, "l1": l1.item(), "l2": l2.item(),
             "kl": kl.item()}
    vae.eval()
    return stats


@torch.no_grad()
def encode_pool(model: StableDiffusion, images: torch.Tensor, device, batch: int = 1024) -> torch.Tensor:
    """Posterior moments (mean, logvar) of every pool image, (N, 8, 16, 16), unscaled."""
    out = []
    for i in range(0, len(images), batch):
        x = to_unit(images[i:i + batch].to(device))
        out.append(model.vae.encode(x).moments.float())
    return torch.cat(out)


def set_scale_factor(model: StableDiffusion, moments: torch.Tensor) -> float:
    """As the SD authors did for their VAE (0.18215): measure the std of sampled latents on training data and
    store 1/std, so the diffusion model sees unit-variance latents whatever scale the autoencoder chose."""
    mean, logvar = moments.chunk(2, dim=1)
    z = mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn_like(mean)
    model.cfg.vae.scale_factor = float(1.0 / z.std())
    return model.cfg.vae.scale_factor


@torch.no_grad()
def reconstruction_scores(model: StableDiffusion, n: int = 256, seed: int = 4242, device="cpu") -> dict:
    """How much of each style and of the subject survives encode -> decode (posterior mean), as the probe reads
    it: an upper bound for what a fine-tune can reach. {"plain": shape & colour acc, "<style>": style acc, ...}."""
    from .probe import load_probe, score, to_tensor
    probe, out = load_probe(device="cpu"), {}
    for style, subject in [("plain", False), *VAE_EXTRA]:
        pairs = world.sample(n, seed, split="heldout", style=None if style == "plain" else style, subject=subject)
        attrs = [a for a, _ in pairs]
        x = to_tensor([world.render(a) for a in attrs]).to(device) * 2 - 1                 # (n, 3, 64, 64)
        y = model.vae.decode(model.vae.encode(x).mean).float().clamp(-1, 1)
        res = score(((y + 1) / 2).cpu(), attrs, probe)
        key = "subject" if subject else style
        out[key] = round(res["subject"] if subject else res["style_adoption"] if style != "plain"
                         else min(res["shape"], res["colour"]), 4)
    return out


# ---------------------------------------------------------------------------------------------------- phase 2

def train_diffusion(model: StableDiffusion, moments: torch.Tensor, ids: torch.Tensor, steps: int,
                    batch: int = 64, lr: float = 5e-4, drop: float = 0.1, ema_decay: float = 0.999,
                    seconds: float | None = None, device="cpu", log=print, seed: int = 0):
    """Phase 2: UNet + text encoder with the ε-prediction loss; returns (EMA copies (unet, text encoder), stats)."""
    unet, te = model.unet.train(), model.text_encoders[0].train()
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    sched = NoiseSchedule(model.cfg.schedule)
    ab = sched.alphas_cumprod.to(device)
    # Exponential moving averages of the weights sample far better than the raw weights (Ho et al. 2020, App. B).
    ema = [copy.deepcopy(unet).eval().requires_grad_(False), copy.deepcopy(te).eval().requires_grad_(False)]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    empty = model.tokenizers[0]([""]).to(device)                                # (1, T)
    scale = model.cfg.vae.scale_factor
    amp = device.type == "cuda"
    budget, losses = Budget(steps, seconds), []
    while budget.progress() < 1.0:
        for g in opt.param_groups:
            g["lr"] = lr * lr_at(budget.progress())
        idx = torch.randint(len(moments), (batch,), generator=gen).to(moments.device)
        tpl = torch.randint(ids.shape[1], (batch,), generator=gen).to(ids.device)
        m = moments[idx].to(device)
        mean, logvar = m.chunk(2, dim=1)
        z0 = (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn_like(mean)) * scale  # (B, 4, 16, 16)
        tok = ids[idx, tpl].to(device)                                          # (B, T)
        # Classifier-free guidance dropout (Ho & Salimans 2022): the empty caption stands for "no prompt".
        keep = (torch.rand(batch, generator=gen) >= drop).to(device)
        tok = torch.where(keep[:, None], tok, empty)
        t = torch.randint(len(ab), (batch,), generator=gen).to(device)
        eps = torch.randn_like(z0)
        a = ab[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps                               # Eq. (4) of Ho et al.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            ctx = te(tok)
            ctx = ctx[0] if isinstance(ctx, tuple) else ctx                     # (B, T, D); [1] is SDXL's pooled
            pred = unet(zt, t.float(), ctx)
        loss = F.mse_loss(pred.float(), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        budget.step += 1
        d = min(ema_decay, (1 + budget.step) / (10 + budget.step))              # short warm-up of the EMA
        with torch.no_grad():  # one fused call per model instead of one kernel launch per tensor
            for e, live in zip(ema, (unet, te)):
                torch._foreach_lerp_(list(e.parameters()), list(live.parameters()), 1 - d)
        losses.append(loss.item() if budget.step % 10 == 0 or budget.step < 10 else losses[-1])
        if budget.step % 200 == 0 or budget.step == 1:
            recent = losses[-200:]
            log(f"unet step {budget.step:5d}  loss {sum(recent) / len(recent):.4f}  lr {opt.param_groups[0]['lr']:.2e}  "
                f"{time.time() - budget.t0:.0f}s")
    recent = losses[-500:]
    stats = {"steps": budget.step, "seconds": time.time() - budget.t0, "loss": sum(recent) / len(recent),
             "first_loss": losses[0]}
    unet.eval(), te.eval()
    return ema, stats


# ---------------------------------------------------------------------------------------------------- commands

def pretrain(a: argparse.Namespace, log=print) -> dict:
    """The whole recipe: pool -> VAE -> scale factor -> latents -> UNet + text encoder -> save (EMA weights)."""
    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    t0 = time.time()
    # Render first: the worker processes are forked before CUDA is initialised.
    images, attrs = make_pool(a.pool, a.seed, "train", workers=a.workers)
    styled = a.vae_styled and not a.vae_from
    vae_extra = make_pool(a.vae_styled, a.seed, "train", workers=a.workers, styled=True)[0] if styled else None
    cfg = ModelConfig.from_dict(WORLD_TINY.to_dict())                          # a private copy of the preset
    model = StableDiffusion(cfg)
    if a.vae_from or a.init:
        from ..formats import load_model
    if a.init:  # warm start: phase 2 continues from these UNet + text encoder weights
        donor = load_model(a.init).float()
        model.unet.load_state_dict(donor.unet.state_dict())
        model.text_encoders[0].load_state_dict(donor.text_encoders[0].state_dict())
    model = model.to(device)
    ids = caption_ids(model.tokenizers[0], attrs, a.partial, a.seed)
    log(f"pool: {len(images)} train-split images, {ids.shape} caption ids in {time.time() - t0:.0f}s")
    images = images.to(device)
    if a.vae_from:  # phase 1 skipped: this autoencoder and its scale factor, unchanged
        donor = load_model(a.vae_from).float()
        model.vae.load_state_dict(donor.vae.state_dict())
        scale = model.cfg.vae.scale_factor = donor.cfg.vae.scale_factor
        vae_stats = {"from": a.vae_from}
        moments = encode_pool(model, images, device)
        log(f"VAE and scale_factor {scale:.5f} from {a.vae_from}")
    else:
        vae_images = images if vae_extra is None else torch.cat([images, vae_extra.to(device)])
        vae_stats = train_vae(model, vae_images, a.vae_steps, a.vae_batch, a.vae_lr,
                              seconds=a.vae_minutes * 60 or None, device=device, log=log, seed=a.seed)
        del vae_images
        vae_stats["recon"] = reconstruction_scores(model, device=device)
        log(f"VAE reconstructions read by the probe: {vae_stats['recon']}")
        moments = encode_pool(model, images, device)  # the diffusion phase: plain images only
        scale = set_scale_factor(model, moments)
        log(f"latent std {1 / scale:.4f} -> scale_factor {scale:.5f}")
    ids = ids.to(device)
    ema, unet_stats = train_diffusion(model, moments, ids, a.steps, a.batch, a.lr, a.drop,
                                      seconds=a.minutes * 60 or None, device=device, log=log, seed=a.seed)
    model.unet.load_state_dict(ema[0].state_dict())
    model.text_encoders[0].load_state_dict(ema[1].state_dict())
    model = model.float().cpu().eval()
    info = {"vae": vae_stats, "unet": unet_stats, "scale_factor": scale, "pool": len(images),
            "seconds": time.time() - t0}
    if a.out:  # formats/safe_write.py: an existing folder only with --overwrite, and only an earlier minisd folder
        with atomic_folder(a.out, getattr(a, "overwrite", False), MINISD,
                           protect=[getattr(a, "vae_from", None), getattr(a, "init", None)]) as tmp:
            write_model_files(model, tmp, dtype=torch.float16)
        log(f"saved {a.out}")
    return {"model": model, **info}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minisd.world.pretrain",
                                description="Train minisd-tiny (VAE, then UNet + CLIP text encoder) from scratch on "
                                            "the procedural world. `python -m minisd.world.pretrain eval --help`: probe "
                                            "fidelity of a trained model on held-out prompts. It keeps no checkpoints: Ctrl-C or SIGTERM "
                                            "ends it with one line and leaves --out as it was.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT, help="minisd folder to write (fp16 weights)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out that is an earlier minisd folder holding nothing else (a model "
                        "card is the user's: move it first); default: refuse an existing --out before training")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool", type=int, default=60000, help="train-split images rendered once and reused")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes rendering the pool")
    p.add_argument("--vae-steps", type=int, default=4000)
    p.add_argument("--vae-batch", type=int, default=128)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-styled", type=int, default=20000,
                   help="extra styled / subject images for the VAE phase only (the UNet never sees them)")
    p.add_argument("--vae-minutes", type=float, default=0.0, help="also stop phase 1 after this long (0: no cap)")
    p.add_argument("--vae-from", default=None, metavar="DIR",
                   help="skip phase 1: take the autoencoder and its scale_factor from this minisd folder")
    p.add_argument("--init", default=None, metavar="DIR",
                   help="start phase 2 from this minisd folder's UNet and text encoder (default: from scratch)")
    p.add_argument("--partial", type=int, default=12,
                   help="partial-caption slots per image beside the 4 full templates (0: full captions only)")
    p.add_argument("--steps", type=int, default=20000, help="phase 2 steps")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--drop", type=float, default=0.1, help="caption dropout for classifier-free guidance")
    p.add_argument("--minutes", type=float, default=0.0, help="also stop phase 2 after this long (0: no cap)")
    p.add_argument("--eval", type=int, default=0, help="after training, probe this many held-out prompts")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"]:
        return eval_main(argv[1:])
    if argv[:1] == ["train"]:
        argv = argv[1:]
    p = build_parser()
    a = p.parse_args(argv)
    if a.partial < 0:
        p.error("--partial must be >= 0")
    for flag, path in (("--vae-from", a.vae_from), ("--init", a.init)):
        if path is not None and not os.path.isfile(os.path.join(path, "config.json")):
            p.error(f"{flag} {path}: not a minisd model folder (no config.json)")
    phase1 = [k for k in ("vae_steps", "vae_batch", "vae_lr", "vae_styled", "vae_minutes")
              if getattr(a, k) != p.get_default(k)]
    if a.vae_from and phase1:  # phase 1 is skipped: these would do nothing
        p.error(f"--vae-from skips phase 1, so {', '.join('--' + k.replace('_', '-') for k in phase1)} cannot apply")
    try:  # before hours of training, not after
        check_folder_dest(a.out, a.overwrite, MINISD, protect=[a.vae_from, a.init])
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("pretrain settings: " + ", ".join(f"{k}={v}" for k, v in vars(a).items()), flush=True)
    # Ctrl-C / SIGTERM: pretraining keeps no checkpoints, so a stop ends with one line (no traceback) and --out is
    # as it was (save_model writes a sibling folder and renames it into place at the end)
    from ..train.signals import raise_on_signals, signal_name
    restore_signals, t0, res = raise_on_signals(), time.time(), None
    try:
        res = pretrain(a, log=lambda s: print(s, flush=True))
        if a.eval:
            for c in (3.0, 5.0):
                r = probe_fidelity(res["model"], a.eval, 20, c, device=a.device)
                print(f"probe, {a.eval} held-out prompts, ddim 20 steps, cfg {c}: {r}", flush=True)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", 2)
        if res is not None:  # stopped during --eval: the model is complete
            print(f"error: evaluation stopped by {signal_name(signum)}; {a.out} was written before", file=sys.stderr)
        else:
            print(f"error: pretraining stopped by {signal_name(signum)} after {time.time() - t0:.0f} s; nothing was "
                  f"written to {a.out} (pretraining keeps no checkpoints: run it again; --minutes / --vae-minutes "
                  "cap its length)", file=sys.stderr)
        return 128 + signum
    finally:
        restore_signals()
    return 0


if __name__ == "__main__":
    sys.exit(main())
