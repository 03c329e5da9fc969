"""Samplers: DDPM, DDIM, Euler, Euler ancestral and DPM-Solver++(2M), each a few lines of maths.

They reproduce diffusers' schedulers (DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler,
EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler with algorithm_type="dpmsolver++")
bit for bit in fp32, including the random numbers: every draw is `torch.randn(model_output.shape,
generator=...)` at the same point of the same step, so one seeded CPU generator gives the same image.

The loop that uses them (pipeline.py):

    smp = make_sampler("euler", cfg, steps=30)
    x = randn(shape, generator=g) * smp.init_noise_sigma
    for i, t in enumerate(smp.timesteps):
        out = unet(smp.scale_model_input(x, i), t)      # ε, v or x_0: cfg.prediction_type
        x = smp.step(out, i, x, generator=g)

Two views of the same process (see schedule.py for the notation):
    DDPM / DDIM / DPM-Solver   x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε        ("variance preserving")
    Euler / Euler a            x   = x_0 + σ·ε,  σ = √((1−ᾱ)/ᾱ)      ("variance exploding", x = x_t/√ᾱ_t);
                               the UNet still sees x_t, hence scale_model_input = x/√(σ²+1).
Every sampler turns the network output (ε, v or x_0) into x̂_0 through the one `schedule.denoise`,
told which view its x is in (α, σ, var); the samplers themselves are then written over x̂_0 alone.

Timestep grids (diffusers' `timestep_spacing`, Lin et al. 2023 Table 2), T = 1000 training steps, n steps:
    leading    t = k·(T//n) + steps_offset, k = n−1 … 0        (SD1/SD2/SDXL official configs, offset 1)
    linspace   t = round(linspace(0, T−1, n)) reversed          (Euler, DPM: not rounded for Euler)
    trailing   t = round(T … 0 step −T/n) − 1                   (always starts at T−1)
`cfg.timestep_spacing = None` means "the scheduler class's own default", which is what diffusers
does when a scheduler_config.json has no `timestep_spacing` key (SD1.x, SD2.x): leading for DDPM
and DDIM, linspace for Euler, Euler a and DPM++.
"""
from __future__ import annotations

import numpy as np
import torch

from .config import ScheduleConfig
from .schedule import NoiseSchedule, denoise

SAMPLERS = ("ddim", "ddpm", "euler", "euler_a", "dpmpp_2m")
# diffusers' default `timestep_spacing` per scheduler class, used when the config does not say.
DEFAULT_SPACING = {"ddim": "leading", "ddpm": "leading", "euler": "linspace", "euler_a": "linspace",
                   "dpmpp_2m": "linspace"}
KARRAS_RHO = 7.0  # ρ of Karras et al. 2022, Eq. 5: "ρ = 7 … the best results"


# ---------------------------------------------------------------------------------------------
# Grids: timesteps and σ's (computed once per run, in numpy with diffusers' dtypes)
# ---------------------------------------------------------------------------------------------
def spaced_timesteps(T: int, n: int, spacing: str, offset: int = 0) -> np.ndarray:
    """n descending training timesteps as float64, not yet rounded for "linspace"."""
    if spacing == "linspace":
        return np.linspace(0, T - 1, n)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (T // n))[::-1].astype(np.float64) + offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)) - 1
    raise ValueError(f"unknown timestep_spacing {spacing!r} (expected leading, linspace or trailing)")


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = KARRAS_RHO) -> np.ndarray:
    """Eq. (5) of Karras et al. 2022: σ_i = (σ_max^(1/ρ) + i/(n−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ.
    Uniform in σ^(1/ρ), so the steps crowd at low noise where detail is formed."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigma_table: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each σ: linear interpolation of t in log σ (k-diffusion's
    `DiscreteSchedule.sigma_to_t`), clamped to [0, T−1]. `log_sigma_table` is float32, ascending in t."""
    log_s = np.log(np.maximum(sigmas, 1e-10))                                        # float64
    # low = last table index with log σ_table <= log σ (0 if none), so [low, low+1] brackets σ.
    low = np.clip(np.searchsorted(log_sigma_table, log_s, side="right") - 1, 0, len(log_sigma_table) - 2)
    high = low + 1
    lo_v, hi_v = log_sigma_table[low], log_sigma_table[high]
    # (lo_v − hi_v) stays float32, as in diffusers; the rest is float64.
    w = np.clip((lo_v - log_s) / (lo_v - hi_v), 0, 1)
    return (1 - w) * low + w * high


def _randn(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Noise shaped like the model output, drawn on the generator's device (CPU generator -> same
    numbers on every accelerator), as diffusers' randn_tensor does."""
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


# ---------------------------------------------------------------------------------------------
# The samplers
# ---------------------------------------------------------------------------------------------
class Sampler:
    """Shared interface. `i` always indexes `timesteps`; subclasses implement `step`."""
    name = ""

    def __init__(self, cfg: ScheduleConfig, steps: int):
        if not 1 <= steps <= cfg.num_train_timesteps:
            raise ValueError(f"steps must be in 1..{cfg.num_train_timesteps}, got {steps}")
        self.cfg, self.steps = cfg, steps
        self.schedule = NoiseSchedule(cfg)
        self.prediction_type = cfg.prediction_type
        self.spacing = cfg.timestep_spacing or DEFAULT_SPACING[self.name]
        self.init_noise_sigma = 1.0

    def _int_timesteps(self, n: int) -> np.ndarray:
        # DDPM / DDIM / DPM use integer timesteps (numpy rounds half to even, as diffusers does).
        return np.round(spaced_timesteps(self.cfg.num_train_timesteps, n, self.spacing,
                                         self.cfg.steps_offset)).astype(np.int64)

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return x

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor, generator=None) -> torch.Tensor:
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """x_t at t = timesteps[i] (Eq. 4); the σ-based samplers override this."""
        return self.schedule.q_sample(x0, noise, self.timesteps[i])

    def img2img_start(self, strength: float) -> int:
        """Index of the first step of img2img: the last ⌊steps·strength⌋ steps are run.
        Raises when that is no step at all (diffusers' pipeline fails there too)."""
        run = min(int(self.steps * strength), self.steps)
        start = max(self.steps - run, 0)
        if start >= len(self.timesteps):
            raise ValueError(f"strength {strength} with {self.steps} steps leaves no step to run")
        return start

    def __repr__(self):
        return f"{type(self).__name__}(steps={self.steps}, spacing={self.spacing!r})"


class DDPMSampler(Sampler):
    """Ancestral sampling of Ho et al. 2020 (Algorithm 2) on a strided grid t → t' = next timestep.

    Posterior q(x_t' | x_t, x_0) with α = ᾱ_t/ᾱ_t', β = 1 − α (Eqs. 6-7 with the stride folded in):
        mean = √ᾱ_t'·β/(1−ᾱ_t') · x_0 + √α·(1−ᾱ_t')/(1−ᾱ_t) · x_t,   var = (1−ᾱ_t')/(1−ᾱ_t) · β
    and x_t' = mean + √var · z, z ~ N(0, I), drawn whenever t > 0 (so also at the last step when
    steps_offset = 1, whose t is 1).
    """
    name = "ddpm"

    def __init__(self, cfg, steps):
        super().__init__(cfg, steps)
        self.timesteps = torch.from_numpy(self._int_timesteps(steps))

    def step(self, model_output, i, x, generator=None):
        t = self.timesteps[i]
        ac = self.schedule.alphas_cumprod
        ab_t = ac[t]
        # Past the last timestep the chain ends at x_0, i.e. ᾱ = 1.
        ab_prev = ac[self.timesteps[i + 1]] if i + 1 < len(self.timesteps) else torch.tensor(1.0)
        alpha = ab_t / ab_prev                       # α of the strided step
        beta = 1 - alpha
        x0, _ = self.schedule.denoise(model_output, x, t)
        mean = (ab_prev ** 0.5 * beta) / (1 - ab_t) * x0 + alpha ** 0.5 * (1 - ab_prev) / (1 - ab_t) * x
        if t > 0:
            z = _randn(model_output, generator)
            # "fixed_small" variance β̃; clamped because it is exactly 0 when ᾱ_t' = 1 … t' = −1 at t = 0.
            var = torch.clamp((1 - ab_prev) / (1 - ab_t) * beta, min=1e-20)
            mean = mean + var ** 0.5 * z
        return mean


class DDIMSampler(Sampler):
    """DDIM, Song et al. 2021, Eq. (12):

        x_t' = √ᾱ_t'·x̂_0 + √(1 − ᾱ_t' − σ²)·ε̂ + σ·z,   σ = η·√((1−ᾱ_t')/(1−ᾱ_t))·√(1 − ᾱ_t/ᾱ_t')

    η = 0 is deterministic; η = 1 is DDPM. As in diffusers, t' = t − T//n whatever the spacing, and
    past the end ᾱ_t' is 1 if set_alpha_to_one else ᾱ_0 (the SD configs: ᾱ_0 = 0.99915).
    """
    name = "ddim"

    def __init__(self, cfg, steps, eta: float = 0.0):
        super().__init__(cfg, steps)
        self.eta = eta
        self.timesteps = torch.from_numpy(self._int_timesteps(steps))
        ac = self.schedule.alphas_cumprod
        self.final_alpha_cumprod = torch.tensor(1.0) if cfg.set_alpha_to_one else ac[0]

    def step(self, model_output, i, x, generator=None):
        t = self.timesteps[i]
        t_prev = t - self.cfg.num_train_timesteps // self.steps
        ac = self.schedule.alphas_cumprod
        ab_t = ac[t]
        ab_prev = ac[t_prev] if t_prev >= 0 else self.final_alpha_cumprod
        x0, eps = self.schedule.denoise(model_output, x, t)
        var = (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)
        std = self.eta * var ** 0.5
        # "direction pointing to x_t" plus the predicted x_0 rescaled to t'.
        x_prev = ab_prev ** 0.5 * x0 + (1 - ab_prev - std ** 2) ** 0.5 * eps
        if self.eta > 0:
            x_prev = x_prev + std * _randn(model_output, generator)
        return x_prev


class _SigmaSampler(Sampler):
    """Base of the samplers that walk a σ grid (σ_0 > … > σ_{n−1} > σ_n = 0)."""

    def _sigma_grid(self, t: np.ndarray) -> np.ndarray:
        # σ at fractional t: linear interpolation of the float32 table, in float64 (np.interp).
        return np.interp(t, np.arange(self.cfg.num_train_timesteps), self.schedule.sigmas.numpy())

    def _set_sigmas(self, sigmas: np.ndarray):
        # Final σ = 0 ("final_sigmas_type zero"): the last step lands on the clean x_0.
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))  # (n+1,)


class EulerSampler(_SigmaSampler):
    """Euler's method on the probability-flow ODE dx/dσ = (x − D(x; σ))/σ, where D is the denoiser
    (x̂_0): Karras et al. 2022, Algorithm 2 with S_churn = 0 (no noise added back) and without its
    2nd-order correction, i.e. k-diffusion's `sample_euler`:  x_{i+1} = x_i + (σ_{i+1} − σ_i)·(x_i − x̂_0)/σ_i.
    """
    name = "euler"

    def __init__(self, cfg, steps, karras: bool = False):
        super().__init__(cfg, steps)
        T = cfg.num_train_timesteps
        # Euler keeps fractional float32 timesteps (linspace is not rounded).
        t = spaced_timesteps(T, steps, self.spacing, cfg.steps_offset).astype(np.float32)
        sigmas = self._sigma_grid(t)
        if karras:
            # Karras σ's between the grid's own ends; the UNet gets the t that has each σ.
            sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), steps)
            t = sigma_to_t(sigmas, np.log(self.schedule.sigmas.numpy())).astype(np.float32)
        self._set_sigmas(sigmas)
        self.timesteps = torch.from_numpy(t)
        smax = self.sigmas.max()
        # x_T ~ N(0, σ_max²) … plus the unit variance of x_0 when the grid does not start at T−1
        # (diffusers' choice for "leading"; for linspace/trailing it uses σ_max alone).
        self.init_noise_sigma = float(smax if self.spacing in ("linspace", "trailing") else (smax ** 2 + 1) ** 0.5)

    def scale_model_input(self, x, i):
        # x = x_t/√ᾱ has variance 1 + σ²; the UNet was trained on unit-variance x_t.
        return x / ((self.sigmas[i] ** 2 + 1) ** 0.5)

    def add_noise(self, x0, noise, i):
        return x0 + noise * self.sigmas[i].to(x0)

    def _denoised(self, out, x, sigma):
        """x̂_0 at noise level σ: x = x_0 + σ·ε (α = 1), and the UNet saw x/√(σ²+1) (var = σ² + 1)."""
        return denoise(out, x, 1.0, sigma, self.prediction_type, var=sigma ** 2 + 1)[0]

    def step(self, model_output, i, x, generator=None):
        x = x.float()
        sigma = self.sigmas[i]
        d = (x - self._denoised(model_output, x, sigma)) / sigma       # dx/dσ
        return (x + d * (self.sigmas[i + 1] - sigma)).to(model_output.dtype)


class EulerAncestralSampler(EulerSampler):
    """Euler ancestral (k-diffusion `sample_euler_ancestral`, η = 1): an Euler step down to σ_down,
    then fresh noise of std σ_up, with σ_up² + σ_down² = σ_{i+1}² and
        σ_up = √(σ_{i+1}²·(σ_i² − σ_{i+1}²)/σ_i²)   (the DDPM posterior variance in σ form).
    No Karras grid (diffusers has none for this scheduler). One draw per step, the last one included.
    """
    name = "euler_a"

    def __init__(self, cfg, steps):
        if cfg.prediction_type == "sample":
            raise NotImplementedError("euler_a does not support prediction_type 'sample' (nor does diffusers)")
        super().__init__(cfg, steps, karras=False)

    def step(self, model_output, i, x, generator=None):
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x = x.float()
        x0 = self._denoised(model_output, x, sigma)
        sigma_up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5
        sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
        x = x + (x - x0) / sigma * (sigma_down - sigma)
        x = x + _randn(model_output, generator) * sigma_up
        return x.to(model_output.dtype)


class DPMSolverPP2MSampler(_SigmaSampler):
    """DPM-Solver++(2M), Lu et al. 2022 ("DPM-Solver++", Algorithm 2, multistep, data prediction).

    With α = 1/√(σ²+1), s = σ·α (VP coordinates) and λ = log(α/s), one step from λ_i to λ_{i+1},
    h = λ_{i+1} − λ_i:
        x_{i+1} = (s_{i+1}/s_i)·x_i − α_{i+1}·(e^{−h} − 1)·D,
        D = x̂_0_i                                         (first order: step 0 and the last step)
        D = x̂_0_i + (x̂_0_i − x̂_0_{i−1})/(2r),  r = h_{i−1}/h   (second order, midpoint form)
    The last step (to σ = 0) is first order, as diffusers does for final_sigmas_type="zero". The
    sampler keeps x̂_0 of the previous step (make a fresh one per image batch; a run that starts
    again at step 0 or at an img2img start index begins with a first-order step anyway).
    """
    name = "dpmpp_2m"

    def __init__(self, cfg, steps, karras: bool = False):
        super().__init__(cfg, steps)
        if self.spacing == "trailing":
            t = self._int_timesteps(steps)
        else:
            # Lay out n+1 points ending at 0 and drop the 0 (diffusers' DPM convention).
            t = self._int_timesteps(steps + 1)[:-1]
        table = self.schedule.sigmas.numpy()
        if karras:
            # Karras σ's over the whole training range, then rounded to integer timesteps.
            sigmas = karras_sigmas(table[0].item(), table[-1].item(), steps)
            t = np.round(sigma_to_t(sigmas, np.log(table)))
        else:
            sigmas = self._sigma_grid(t)
        self._set_sigmas(sigmas)
        self.timesteps = torch.from_numpy(t).to(torch.int64)
        self._prev = None         # (i, x̂_0) of the previous step: the "multistep" memory

    @staticmethod
    def _alpha_sigma(sigma):
        alpha = 1 / ((sigma ** 2 + 1) ** 0.5)
        return alpha, sigma * alpha

    def add_noise(self, x0, noise, i):
        alpha, s = self._alpha_sigma(self.sigmas[i].to(x0))
        return alpha * x0 + s * noise

    def step(self, model_output, i, x, generator=None):
        # x̂_0 from the network output at this step's σ (x here is x_t itself, VP: no input scaling).
        alpha, s = self._alpha_sigma(self.sigmas[i])
        x0, _ = denoise(model_output, x, alpha, s, self.prediction_type)
        x = x.float()
        alpha_t, s_t = self._alpha_sigma(self.sigmas[i + 1])
        lam_t = torch.log(alpha_t) - torch.log(s_t)       # +inf at σ = 0: e^{−h} = 0, x_{i+1} = x̂_0
        lam_s = torch.log(alpha) - torch.log(s)
        h = lam_t - lam_s
        # First-order (DPM-Solver++ 1 = DDIM) update with D = x̂_0 ...
        x_next = (s_t / s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        # ... plus the second-order correction when there is a previous x̂_0 and this is not the
        # last step (a finite difference over a step to σ = 0 would be meaningless: h = ∞).
        # Only a step taken just before this one counts, so a reused sampler restarts cleanly.
        if self._prev is not None and self._prev[0] == i - 1 and i < len(self.timesteps) - 1:
            alpha_p, s_p = self._alpha_sigma(self.sigmas[i - 1])
            r = (lam_s - (torch.log(alpha_p) - torch.log(s_p))) / h      # r = h_{i−1} / h_i
            d1 = (1.0 / r) * (x0 - self._prev[1])
            x_next = x_next - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
        self._prev = (i, x0)
        return x_next.to(model_output.dtype)


def make_sampler(name: str, cfg: ScheduleConfig, steps: int, karras: bool = False,
                 eta: float = 0.0) -> Sampler:
    """A fresh sampler for one run of `steps` steps. `karras` (Karras σ grid) works with euler and
    dpmpp_2m; `eta` is DDIM's η and ignored by the others (as diffusers' pipelines do)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    if karras and name not in ("euler", "dpmpp_2m"):
        raise ValueError(f"--karras works with euler and dpmpp_2m, not {name}")
    if name == "ddim":
        smp = DDIMSampler(cfg, steps, eta=eta)
    elif name == "ddpm":
        smp = DDPMSampler(cfg, steps)
    elif name == "euler":
        smp = EulerSampler(cfg, steps, karras=karras)
    elif name == "euler_a":
        smp = EulerAncestralSampler(cfg, steps)
    else:
        smp = DPMSolverPP2MSampler(cfg, steps, karras=karras)
    # "leading" spacing adds steps_offset (1 in the official configs): with T//n = 1 (n > T/2) the first step
    # lands on t = T, one past the table. diffusers indexes past it too; we refuse with the largest n that fits.
    T, last = cfg.num_train_timesteps, float(max(smp.timesteps))
    if last > T - 1:
        fits = max(n for n in range(1, steps) if float(max(spaced_timesteps(T, n, smp.spacing, cfg.steps_offset)))
                   <= T - 1) if steps > 1 else 0
        raise ValueError(f"{steps} {name} steps with {smp.spacing} spacing and steps_offset {cfg.steps_offset} "
                         f"start at t = {last:g}, past the schedule's last timestep {T - 1}: use at most {fits} "
                         "steps")
    return smp
