"""minisd.schedule vs diffusers' DDPMScheduler / EulerDiscreteScheduler and the CompVis buffer semantics."""
import json
import os

import pytest
import torch

from conftest import REFERENCE

from diffusers import DDPMScheduler, EulerDiscreteScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as hf_rescale

from minisd.config import ScheduleConfig
from minisd.schedule import NoiseSchedule, make_betas, rescale_zero_terminal_snr

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
DDPM_LINEAR = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")


def maxdiff(a, b):
    return (a.double() - b.double()).abs().max().item()


def check(ours, ref, tol=1e-6, what=""):
    d = maxdiff(ours, ref)
    assert d <= tol, f"{what}: max |diff| = {d:.3e} > {tol:.0e}"


@pytest.mark.parametrize("betas", [SD, DDPM_LINEAR], ids=["scaled_linear", "linear"])
def test_betas_and_alphas_cumprod_bitwise(betas):
    ours = NoiseSchedule(ScheduleConfig(**betas))
    ref = DDPMScheduler(**betas)
    assert ours.betas.dtype == torch.float32
    assert torch.equal(ours.betas, ref.betas), maxdiff(ours.betas, ref.betas)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod), maxdiff(ours.alphas_cumprod, ref.alphas_cumprod)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_q_sample_velocity_target(pred):
    ours = NoiseSchedule(ScheduleConfig(**SD, prediction_type=pred))
    ref = DDPMScheduler(**SD, prediction_type=pred)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 4, 8, 8, generator=g)
    noise = torch.randn(5, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 500, 998, 999])
    check(ours.q_sample(x0, noise, t), ref.add_noise(x0, noise, t), 0, "q_sample vs add_noise")
    check(ours.velocity(x0, noise, t), ref.get_velocity(x0, noise, t), 0, "velocity vs get_velocity")
    want = {"epsilon": noise, "v_prediction": ref.get_velocity(x0, noise, t), "sample": x0}[pred]
    check(ours.training_target(x0, noise, t), want, 0, "training_target")
    # A scalar t broadcasts like a (B,) one.
    check(ours.q_sample(x0, noise, 500), ref.add_noise(x0, noise, torch.full((5,), 500)), 0, "scalar t")


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_to_x0_to_eps_invert_the_target(pred):
    # float64 so the check is about the algebra, not about 1/√ᾱ amplifying fp32 rounding at t = 999.
    s = NoiseSchedule(ScheduleConfig(**SD, prediction_type=pred))
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 4, 6, 6, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 4, 6, 6, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 250, 750, 999])
    xt = s.q_sample(x0, eps, t)
    target = s.training_target(x0, eps, t)
    check(s.to_x0(target, xt, t), x0, 3e-14, "to_x0")  # measured 2.7e-15 (float64)
    check(s.to_eps(target, xt, t), eps, 3e-14, "to_eps")  # measured 6.5e-15


def test_sigmas_and_snr():
    s = NoiseSchedule(ScheduleConfig(**SD))
    ref = EulerDiscreteScheduler(**SD)           # before set_timesteps: all 1000 σ's, descending, then 0
    assert torch.equal(s.sigmas, ref.sigmas[:-1].flip(0)), maxdiff(s.sigmas, ref.sigmas[:-1].flip(0))
    t = torch.arange(1000)
    check(s.snr(t), 1 / s.sigmas.double() ** 2, 2e-7 * s.snr(t).max().item(), "snr = 1/σ² (relative)")  # 6.3e-8
    assert s.sigmas[0].item() == pytest.approx(0.029168, abs=1e-6)   # the σ_min SD users know
    assert s.sigmas[-1].item() == pytest.approx(14.614642, abs=1e-5)  # σ_max


@pytest.mark.parametrize("betas", [SD, DDPM_LINEAR], ids=["scaled_linear", "linear"])
def test_rescale_zero_terminal_snr(betas):
    b = make_betas(ScheduleConfig(**betas))
    ours, ref = rescale_zero_terminal_snr(b), hf_rescale(b.clone())
    assert torch.equal(ours, ref), maxdiff(ours, ref)
    s = NoiseSchedule(ScheduleConfig(**betas), zero_terminal_snr=True)
    hf = DDPMScheduler(**betas, rescale_betas_zero_snr=True)
    assert torch.equal(s.alphas_cumprod, hf.alphas_cumprod)
    assert s.alphas_cumprod[-1].item() == 0.0 and s.snr(999).item() == 0.0     # the point of Algorithm 1
    check(s.alphas_cumprod[0], NoiseSchedule(ScheduleConfig(**betas)).alphas_cumprod[0], 0, "ᾱ_0 kept")  # exact


def test_ldm_buffers_names_shapes_and_semantics():
    """The 12 buffers of SD single files: names/shapes from the official manifest; values mean what
    diffusers computes (ᾱ, ᾱ_{t−1}, DDPM posterior variance and mean coefficients)."""
    with open(os.path.join(REFERENCE, "sd15_single_file.json")) as f:
        manifest = json.load(f)["tensors"]
    s = NoiseSchedule(ScheduleConfig(**SD))
    buf = s.ldm_buffers()
    official = {k: v for k, v in manifest.items() if "." not in k}
    assert set(buf) == set(official), sorted(set(buf) ^ set(official))
    for k, v in buf.items():
        assert list(v.shape) == official[k]["shape"] and official[k]["dtype"] == "F32", k

    ref = DDPMScheduler(**SD)
    ac = ref.alphas_cumprod
    # float64-then-round (CompVis) vs float32 cumprod (diffusers): equal to ~1e-6 relative.
    check(buf["betas"], ref.betas, 1e-8, "betas")  # 1 ulp
    check(buf["alphas_cumprod"], ac, 2e-6, "alphas_cumprod")
    check(buf["alphas_cumprod_prev"][1:], ac[:-1], 2e-6, "alphas_cumprod_prev")
    assert buf["alphas_cumprod_prev"][0].item() == 1.0
    check(buf["sqrt_alphas_cumprod"], ac.sqrt(), 1e-6, "sqrt_alphas_cumprod")  # measured 2.4e-7
    check(buf["sqrt_one_minus_alphas_cumprod"], (1 - ac).sqrt(), 2e-6, "sqrt_one_minus_alphas_cumprod")
    # 1 − ᾱ_0 = 0.00085 loses ~4 digits to cancellation in float32, hence the looser bound on its log.
    check(buf["log_one_minus_alphas_cumprod"], (1 - ac).log(), 1e-4, "log_one_minus_alphas_cumprod")
    check(buf["sqrt_recip_alphas_cumprod"] / ac.rsqrt(), torch.ones(1000), 2e-6, "sqrt_recip (relative)")
    check(buf["sqrt_recipm1_alphas_cumprod"], s.sigmas, 2e-5, "sqrt_recipm1 = σ")
    # Posterior variance = diffusers' DDPM "fixed_small" variance over the full 1000-step chain.
    pv = torch.stack([ref._get_variance(t) for t in range(1000)])
    check(buf["posterior_variance"][1:] / pv[1:], torch.ones(999), 1e-4, "posterior_variance (relative)")
    assert buf["posterior_variance"][0].item() == 0.0
    check(buf["posterior_log_variance_clipped"][1:], pv[1:].log(), 1e-4, "posterior_log_variance_clipped")
    # Posterior mean: DDPMScheduler.step with an x_0-predicting "model" and the noise drawn from a
    # twin generator must equal coef1·x_0 + coef2·x_t + √β̃·z.
    ref_x0 = DDPMScheduler(**SD, prediction_type="sample", clip_sample=False)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x0, xt = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    for t in (1, 10, 500, 999):
        got = ref_x0.step(x0, t, xt, generator=g1).prev_sample
        z = torch.randn(1, 4, 4, 4, generator=g2)
        want = (buf["posterior_mean_coef1"][t] * x0 + buf["posterior_mean_coef2"][t] * xt
                + buf["posterior_variance"][t].sqrt() * z)
        # diffusers forms 1 − ᾱ_t in float32 (4 digits lost at t = 1), CompVis in float64.
        check(got, want, 2e-4 if t < 10 else 1e-5, f"posterior mean at t={t}")
