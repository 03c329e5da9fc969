"""DreamBooth with prior preservation (Ruiz et al. 2022, "DreamBooth: Fine Tuning Text-to-Image Diffusion Models
for Subject-Driven Generation"), with adapters or with --method full.

A few images of one subject are tied to a rare identifier: every instance image trains on the identifier prompt
("a sks emblem", --instance-prompt). Trained alone on that, the model drifts: the class word itself ("emblem")
comes to mean this one subject (language drift) and the variety of the class is lost. Prior preservation keeps the
class: the base model itself draws class images x_pr from the class prompt c_pr ("an emblem", --class-prompt)
before training, and each step adds their ordinary diffusion loss (Eq. 2 of the paper):

    L = E[ w_t ‖x̂_θ(α_t x + σ_t ε, c) − x‖² ] + λ · E[ w_t' ‖x̂_θ(α_t' x_pr + σ_t' ε', c_pr) − x_pr‖² ]

minisd writes both terms as its training loss (minisd/trainer.py: ε- or v-prediction, Min-SNR-γ weights if asked):
loss = L_instance + λ·L_prior, λ = --prior-loss-weight (the paper's λ = 1). Each micro-step draws a batch of
instance images, then a batch of class images of the same size, each with its own t and ε from the run's generator,
in that order (the class loader's position is checkpointed, so --resume stays exact); the two batches then go
through the text encoder(s) and the UNet as one batch of 2B rows (`PriorPreservation.loss`). loss.jsonl records the
sum as `loss` and L_prior as `prior_loss`.

--cuda-graph records the step too: the class batch is loaded on the host before the step (`class_batch`) and handed
to the recording as a second input beside the instance batch, the loss of the pair is a function of tensors and
draws alone (`pair_loss`), and `StepGraph` (minisd/perf/graphs.py) makes the instance draws then the class draws
from the run's generator, the eager order: the same numbers as the eager step.

Class images (`ensure_class_images`), in --class-data DIR:
  * a folder that already holds --num-class-images images is used as it is (the first N by name; their captions
    are replaced by the class prompt);
  * otherwise the base model (before any adapter or update) draws the missing ones: image i is
    `class_{i:05d}.png` from seed i, with the sample grids' sampler settings (DDIM --sample-steps, guidance
    --sample-cfg). Each image is written atomically, so a run stopped during generation leaves whole images, and the
    next run continues at the first missing index and draws exactly what one uninterrupted generation would have;
  * `class_images.json` records how they were drawn (model, prompt, sampler, resolution); a folder drawn otherwise
    is not filled up (one error line), a folder of your own images (no such file) must hold enough of them.
"""
from __future__ import annotations

import json
import os

import torch

from ..formats.safe_write import atomic_path, write_text
from ..pipeline import Pipeline
from ..trainer import Draws, MicroBatch, cat_batches, no_stage, noised_latents, per_image_loss
from .data import CaptionDataset, DataError, Loader, scan
from .rng import rng_state, set_rng_state

MANIFEST = "class_images.json"


def apply_instance_prompt(dataset: CaptionDataset, prompt: str | None) -> None:
    """--instance-prompt: every instance image trains on the identifier prompt instead of its caption."""
    if prompt is not None:
        for ex in dataset.examples:
            ex.caption = prompt


def _manifest(cfg, resolution: int) -> dict:
    model = cfg.model if not os.path.exists(cfg.model) else os.path.abspath(cfg.model)
    return {"model": model, "vae": cfg.vae, "prompt": cfg.class_prompt, "sampler": "ddim",
            "steps": cfg.sample_steps, "cfg_scale": cfg.sample_cfg, "resolution": resolution}


def count_images(folder: str) -> int:
    return len(scan(folder).examples) if os.path.isdir(folder) else 0


def ensure_class_images(trainer, resolution: int) -> int:
    """Fill --class-data up to --num-class-images with images drawn by the (still untouched) base model; returns how
    many were drawn now. Raises DataError (one line) for a folder that cannot be used or filled."""
    cfg = trainer.cfg
    folder, n = cfg.class_data, cfg.num_class_images
    have = count_images(folder)
    if have >= n:
        trainer.log(f"class images: {have} in {folder}, using {n}")
        return 0
    want = _manifest(cfg, resolution)
    path = os.path.join(folder, MANIFEST)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                got = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not a readable record of drawn class images ({e}); remove it, or use another "
                            "--class-data folder") from None
        if not isinstance(got, dict):
            raise DataError(f"{path}: not a record of drawn class images (a JSON object); remove it, or use "
                            "another --class-data folder")
        if got != want:
            diff = next(k for k in want if got.get(k) != want[k])
            raise DataError(f"{folder}: its {have} class images were drawn with another {diff} ({got.get(diff)!r}, "
                            f"this run {want[diff]!r}); use another --class-data folder")
    elif have:
        raise DataError(f"{folder}: holds {have} images of your own, fewer than --num-class-images {n} (add images, "
                        f"lower the number, or give an empty folder to draw them with the base model)")
    os.makedirs(folder, exist_ok=True)
    write_text(path, json.dumps(want, indent=2))  # a fresh private temporary file renamed: never through a link
    missing = [i for i in range(n) if not os.path.isfile(os.path.join(folder, f"class_{i:05d}.png"))]
    trainer.log(f"class images: {have} in {folder}, drawing {len(missing)} more with the base model "
                f"('{cfg.class_prompt}', DDIM {cfg.sample_steps} steps, guidance {cfg.sample_cfg})")
    own = torch.Generator()  # (the run's generator does not exist yet; the pipeline draws from its own)
    saved = rng_state(own)  # drawing changes no global random stream of the run
    from tqdm import tqdm
    try:
        pipe = Pipeline(trainer.model, device=trainer.device, dtype=trainer.amp_dtype or torch.float32, cast=False)
        for i in tqdm(missing, desc="class images", unit="img", disable=not cfg.progress):
            img = pipe(cfg.class_prompt, steps=cfg.sample_steps, cfg_scale=cfg.sample_cfg, seed=i,
                       width=resolution, height=resolution)[0]
            name = os.path.join(folder, f"class_{i:05d}")
            write_text(name + ".txt", cfg.class_prompt + "\n")
            with atomic_path(name + ".png") as tmp:  # the image last: a whole image means a whole pair
                img.save(tmp, format="PNG")
    finally:
        trainer.model.train()
        set_rng_state(own, saved)
    return len(missing)


class PriorPreservation:
    """The class images' loader and the prior term of each micro-step."""

    def __init__(self, trainer):
        cfg = trainer.cfg
        resolution = cfg.resolution or trainer.model.cfg.resolution
        self.drawn = ensure_class_images(trainer, resolution)
        ds = CaptionDataset(cfg.class_data, resolution, 1, cfg.random_crop, cfg.flip, 0.0, cfg.seed + 1)
        pairs = sorted(zip(ds.examples, ds.sizes), key=lambda e: e[0].path)[:cfg.num_class_images]
        ds.examples, ds.sizes = [e for e, _ in pairs], [s for _, s in pairs]
        if len(ds.examples) < cfg.num_class_images:
            raise DataError(f"{cfg.class_data}: only {len(ds.examples)} usable class images, "
                            f"--num-class-images {cfg.num_class_images}")
        for ex in ds.examples:
            ex.caption, ex.repeats = cfg.class_prompt, 1
        ds.slots = list(range(len(ds.examples)))
        ds.targets = [(resolution, resolution)] * len(ds.examples)
        self.dataset, self.loader = ds, Loader(ds, cfg.batch_size)
        self.weight = cfg.prior_loss_weight
        self.sum, self.count = 0.0, 0

    def loss(self, trainer, mb, draw: Draws) -> torch.Tensor:
        """L_instance + λ·L_prior of one micro-step, eager: the instance micro-batch `mb` (its draws from `draw`),
        then the next class batch (its draws from the run's generator, after the instance batch's); --profile times
        the stages. Two calls of B rows (the first version) gave the same losses up to float rounding but launched
        every kernel twice: 0.70x diffusers' step at batch 1 on an H100 (bench/results/h100-2026-12-06)."""
        cb = self.class_batch(trainer)
        loss, prior = self.pair_loss(trainer, mb, cb, draw, Draws(trainer.gen, trainer.device), trainer.prof.stage)
        self.note(prior.detach())
        return loss

    def class_batch(self, trainer) -> MicroBatch:
        """The next class batch on the device: host work (the loader), done before the step, so that --cuda-graph
        hands it to the recording as an input (`Trainer.train_step`)."""
        return trainer.micro_batch(self.loader.next_batch())

    def pair_loss(self, trainer, mb: MicroBatch, cb: MicroBatch, draw: Draws, class_draw: Draws,
                  stage=no_stage) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_instance + λ·L_prior, L_prior) of the instance micro-batch `mb` and the class batch `cb` (each B
        images), a function of these tensors and the draws alone: the instance rows draw from `draw`, then the
        class rows from `class_draw`; both are noised first and then laid end to end for ONE text-encoder and UNet
        call of 2B rows, as diffusers' DreamBooth script does. The eager step passes the run's generator as
        `class_draw`; --cuda-graph records this function (`Trainer.forward_backward`) with one `draw` for both,
        which `StepGraph` fills from the same generator in the same order: the same numbers."""
        opts = dict(trainer.step_options)
        prep = dict(noise_offset=opts.pop("noise_offset"), input_perturbation=opts.pop("input_perturbation"),
                    stage=stage)
        m, noise = trainer.model, trainer.noise
        zi, ti, yi = noised_latents(m, noise, mb, draw, **prep)                                   # (B, ...)
        zc, tc, yc = noised_latents(m, noise, cb, class_draw, **prep)                              # (B, ...)
        per = per_image_loss(m, noise, cat_batches(mb, cb), torch.cat([zi, zc]), torch.cat([ti, tc]),
                             torch.cat([yi, yc]), stage=stage, **opts)                             # (2B,)
        inst, prior = per[:len(ti)].mean(), per[len(ti):].mean()
        return inst + self.weight * prior, prior

    def note(self, prior: torch.Tensor) -> None:
        """Add a micro-step's L_prior (detached) to the running sum, kept on the device and read once per optimizer
        step (`step_mean`): a `.item()` per micro-step would stall the GPU queue."""
        self.last = prior
        self.sum = self.sum + prior
        self.count += 1

    def step_mean(self) -> float:
        """L_prior averaged over the micro-steps since the last call (one optimizer step)."""
        mean = float(self.sum) / max(1, self.count)
        self.sum, self.count = 0.0, 0
        return mean
