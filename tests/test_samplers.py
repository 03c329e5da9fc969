"""minisd.samplers vs diffusers' schedulers, in lockstep from the same latent with a toy "model".

For every sampler x official scheduler config x step count: same timesteps (values and dtype),
same init_noise_sigma, same scale_model_input, and x after every step bit for bit (measured: 0.0 for
every sampler, config and step count on a 2-core x86 VM; `close` keeps its relative form for a future
bound); the stochastic samplers get twin CPU generators with the same seed, so they must also draw the
same noise at the same moments. img2img: start index, forward noising and the rest of the loop against
StableDiffusionImg2ImgPipeline.get_timesteps.
"""
import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import REFERENCE

from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline)

from minisd.config import ScheduleConfig
from minisd.samplers import SAMPLERS, make_sampler

CLASSES = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "euler": EulerDiscreteScheduler,
           "euler_a": EulerAncestralDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}


def load(name):
    with open(os.path.join(REFERENCE, "configs", name)) as f:
        return json.load(f)


CONFIGS = {
    "sd15": load("sd15/scheduler_config.json"),                   # PNDM config: leading, offset 1
    "sd21_768v": load("sd21_768v/scheduler_config.json"),         # v-prediction
    "sdxl_base": load("sdxl_base/scheduler_config.json"),         # Euler, explicit leading
    "ldm_256": load("ldm_text2im_large_256/scheduler_config.derived.json"),  # DDIM, no steps_offset
    # Not official: the other spacing, ᾱ_final = 1, the DDPM betas, x_0-prediction.
    "trailing_sample": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                        "prediction_type": "sample", "timestep_spacing": "trailing",
                        "set_alpha_to_one": True, "clip_sample": False},
    "linspace_v": {**load("sd21_768v/scheduler_config.json"), "timestep_spacing": "linspace"},
}
# (sampler, karras, eta)
VARIANTS = [("ddim", False, 0.0), ("ddim", False, 0.7), ("ddpm", False, 0.0), ("euler", False, 0.0),
            ("euler", True, 0.0), ("euler_a", False, 0.0), ("dpmpp_2m", False, 0.0), ("dpmpp_2m", True, 0.0)]
VARIANT_IDS = [f"{k}{'-karras' if ka else ''}{f'-eta{e}' if e else ''}" for k, ka, e in VARIANTS]


def our_config(d: dict) -> ScheduleConfig:
    """A diffusers scheduler json -> ScheduleConfig. Absent timestep_spacing stays None: each
    diffusers class then uses its own default, and so do we. Other absent keys get the defaults
    diffusers' classes share (set_alpha_to_one matters to DDIM only, whose default is True)."""
    return ScheduleConfig(num_train_timesteps=d.get("num_train_timesteps", 1000),
                          beta_start=d.get("beta_start", 0.0001), beta_end=d.get("beta_end", 0.02),
                          beta_schedule=d.get("beta_schedule", "linear"),
                          prediction_type=d.get("prediction_type", "epsilon"),
                          timestep_spacing=d.get("timestep_spacing"), steps_offset=d.get("steps_offset", 0),
                          set_alpha_to_one=d.get("set_alpha_to_one", True))


def reference(kind, d, karras):
    extra = {"algorithm_type": "dpmsolver++", "solver_order": 2} if kind == "dpmpp_2m" else {}
    if karras:
        extra["use_karras_sigmas"] = True
    return CLASSES[kind].from_config({**d, **extra})


_W = torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(123)) * 0.3


def toy_model(x, t):
    """A fixed, non-linear function of (x, t) standing in for the UNet."""
    return 0.8 * torch.tanh(F.conv2d(x, _W, padding=1)) + 0.2 * torch.sin(float(t) / 100.0 + x)


def close(ours, ref, what, tol=0.0):  # measured max difference 0.0 everywhere: bit-exact
    d = (ours.double() - ref.double()).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    assert d <= tol * scale, f"{what}: max |diff| = {d:.3e} (|ref| max {scale:.3g})"


def run_lockstep(ref, ours, x_ref, x_ours, start, eta, what):
    """Run both loops from step `start` to the end; compare everything on the way."""
    g_ref, g_ours = torch.Generator().manual_seed(42), torch.Generator().manual_seed(42)
    kwargs = {"eta": eta} if isinstance(ref, DDIMScheduler) else {}
    for i in range(start, len(ours.timesteps)):
        t = ref.timesteps[i]
        a, b = ref.scale_model_input(x_ref, t), ours.scale_model_input(x_ours, i)
        close(b, a, f"{what} scale_model_input at step {i}")
        x_ref = ref.step(toy_model(a, t), t, x_ref, generator=g_ref, **kwargs).prev_sample
        x_ours = ours.step(toy_model(b, ours.timesteps[i]), i, x_ours, generator=g_ours)
        close(x_ours, x_ref, f"{what} x after step {i} (t={t.item()})")
    # Both generators must have been advanced by exactly the same draws.
    assert torch.equal(torch.randn(3, generator=g_ref), torch.randn(3, generator=g_ours)), f"{what}: RNG drift"
    return x_ours, x_ref


def unsupported(kind, d):
    return kind == "euler_a" and d.get("prediction_type") == "sample"


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("kind,karras,eta", VARIANTS, ids=VARIANT_IDS)
def test_txt2img_matches_diffusers(kind, karras, eta, config):
    d = CONFIGS[config]
    if unsupported(kind, d):
        with pytest.raises(NotImplementedError):
            make_sampler(kind, our_config(d), 10)
        return
    for steps in (1, 4, 10, 25):
        what = f"{kind} {config} steps={steps}"
        ref = reference(kind, d, karras)
        ref.set_timesteps(steps)
        ours = make_sampler(kind, our_config(d), steps, karras=karras, eta=eta)
        assert ours.timesteps.dtype == ref.timesteps.dtype, what
        assert torch.equal(ours.timesteps, ref.timesteps), f"{what}: {ours.timesteps} vs {ref.timesteps}"
        assert isinstance(ours.init_noise_sigma, float)
        assert ours.init_noise_sigma == float(ref.init_noise_sigma), what
        if hasattr(ref, "sigmas") and hasattr(ours, "sigmas"):
            assert torch.equal(ours.sigmas, ref.sigmas), f"{what}: sigmas"
        # The pipelines' initial latent: randn from the user's CPU generator times init_noise_sigma.
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(2, 4, 8, 8, generator=g)
        x_ours, x_ref = run_lockstep(ref, ours, noise * ref.init_noise_sigma, noise * ours.init_noise_sigma,
                                     0, eta, what)
        assert torch.isfinite(x_ours).all()


@pytest.mark.parametrize("config", ["sd15", "sd21_768v", "sdxl_base", "ldm_256", "trailing_sample"])
@pytest.mark.parametrize("kind,karras,eta", VARIANTS, ids=VARIANT_IDS)
def test_img2img_matches_diffusers(kind, karras, eta, config):
    d = CONFIGS[config]
    if unsupported(kind, d):
        return
    g = torch.Generator().manual_seed(7)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for steps in (4, 10, 25):
        for strength in (0.3, 0.75, 1.0):
            what = f"{kind} {config} steps={steps} strength={strength}"
            ref = reference(kind, d, karras)
            ref.set_timesteps(steps)
            # The pipeline's own method (it also calls set_begin_index on the σ-based schedulers).
            timesteps, n = StableDiffusionImg2ImgPipeline.get_timesteps(
                SimpleNamespace(scheduler=ref), steps, strength, "cpu")
            ours = make_sampler(kind, our_config(d), steps, karras=karras, eta=eta)
            start = ours.img2img_start(strength)
            assert start == steps - n, what
            assert torch.equal(ours.timesteps[start:], timesteps), what
            x_ref = ref.add_noise(x0, noise, timesteps[:1].repeat(2))
            x_ours = ours.add_noise(x0, noise, start)
            close(x_ours, x_ref, f"{what} add_noise")
            run_lockstep(ref, ours, x_ref, x_ours, start, eta, what)


def test_img2img_strength_too_small_raises():
    s = make_sampler("ddim", our_config(CONFIGS["sd15"]), 4)
    with pytest.raises(ValueError):
        s.img2img_start(0.2)          # int(4 * 0.2) = 0 steps left: diffusers' pipeline fails too
    assert s.img2img_start(0.25) == 3


def test_make_sampler_rejects_unknown_and_unsupported():
    cfg = our_config(CONFIGS["sd15"])
    assert SAMPLERS == ("ddim", "ddpm", "euler", "euler_a", "dpmpp_2m")
    with pytest.raises(ValueError):
        make_sampler("plms", cfg, 10)
    for kind in ("ddim", "ddpm", "euler_a"):     # diffusers has no Karras grid for these
        with pytest.raises(ValueError):
            make_sampler(kind, cfg, 10, karras=True)


def test_dpm_restarts_cleanly():
    """DPM++ 2M remembers x̂_0 of the previous step; a new run (from 0 or from an img2img start)
    must still begin with a first-order step, as a fresh diffusers scheduler does."""
    cfg = our_config(CONFIGS["sd15"])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def run(s, start=0):
        y = x
        for i in range(start, len(s.timesteps)):
            y = s.step(toy_model(y, s.timesteps[i]), i, y)
        return y

    s = make_sampler("dpmpp_2m", cfg, 6)
    first = run(s)
    assert torch.equal(run(s), first)
    assert torch.equal(run(s, 3), run(make_sampler("dpmpp_2m", cfg, 6), 3))
