"""The DDPM noise schedule: how much noise sits in x_t at each training timestep t.

Everything here is a function of one fixed table of T = 1000 numbers (the betas). Training uses
`q_sample` and `training_target`; the samplers in samplers.py read `alphas_cumprod` and `sigmas`, and
all of them turn the network output into x̂_0 (and ε̂) through the one `denoise` below.

Notation (t = 0 … T−1 is 0-based as in the CompVis and diffusers code; the paper's t is ours + 1):

    code                 symbol                       meaning
    betas[t]             β_t                          variance of the noise added by step t (Ho et al. 2020, Eq. 2)
    alphas[t]            α_t = 1 − β_t                fraction of the variance step t keeps
    alphas_cumprod[t]    ᾱ_t = Π_{s≤t} α_s            fraction of the signal variance left after t+1 steps
    sqrt(ᾱ_t)            √ᾱ_t                         scale of x_0 inside x_t (Eq. 4)
    sqrt(1 − ᾱ_t)        √(1−ᾱ_t)                     scale of ε inside x_t (Eq. 4)
    sigmas[t]            σ_t = √((1−ᾱ_t)/ᾱ_t)         noise level of x_t/√ᾱ_t = x_0 + σ_t·ε (Karras et al. 2022,
                                                      "variance exploding" view used by Euler / k-diffusion)
    snr(t)               SNR_t = ᾱ_t/(1−ᾱ_t) = σ_t⁻²  signal-to-noise ratio (Kingma et al. 2021)
    velocity(...)        v_t = √ᾱ_t·ε − √(1−ᾱ_t)·x_0  the v-parameterisation (Salimans & Ho 2022, §4)

Numerics: the betas are built exactly as diffusers builds them (float32 linspace of the square
roots, squared in float32; cumprod in float32), so every downstream number agrees with diffusers
bit for bit. The CompVis code computes the same table in float64 and rounds once at the end; the
twelve buffers it stores in single-file checkpoints are reproduced by `ldm_buffers()`.
"""
from __future__ import annotations

import numpy as np
import torch

from .config import ScheduleConfig


def make_betas(cfg: ScheduleConfig) -> torch.Tensor:
    """(T,) float32 betas for `cfg.beta_schedule`.

    "scaled_linear" (called "linear" in the CompVis yaml): β_t = linspace(√β_start, √β_end, T)_t²,
    the SD / LDM schedule. "linear": β_t = linspace(β_start, β_end, T)_t, the original DDPM one.
    """
    T = cfg.num_train_timesteps
    if cfg.beta_schedule == "scaled_linear":
        # The square roots are taken in Python (float64), the linspace and the square in float32:
        # that is diffusers' order of operations, and the last bits of every beta depend on it.
        return torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, T, dtype=torch.float32) ** 2
    if cfg.beta_schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float32)
    raise ValueError(f"unknown beta_schedule {cfg.beta_schedule!r} (expected 'scaled_linear' or 'linear')")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so that the last timestep has SNR exactly 0 (Lin et al. 2023, Algorithm 1).

    With the SD schedule ᾱ_{T−1} ≈ 0.0047, so training never shows the model pure noise, while
    sampling starts from it; the model then cannot make very dark or bright images. The fix keeps
    √ᾱ_0 and shifts/scales √ᾱ_t linearly so that √ᾱ_{T−1} = 0, then reads the betas back.
    """
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    # Shift so the last value is 0, then scale so the first one is unchanged.
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab ** 2
    # Undo the cumulative product: α_t = ᾱ_t / ᾱ_{t−1}, and α_0 = ᾱ_0.
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1 - alphas


def denoise(pred: torch.Tensor, x: torch.Tensor, alpha, sigma, prediction_type: str,
            var=1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The one denoiser: network output -> (x̂_0, ε̂), for every sampler (k-diffusion's one-wrapper idea).

    x = α·x_0 + σ·ε is the sample the sampler holds, with var = α² + σ² its variance for unit-variance x_0:
        VP samplers (DDPM, DDIM, DPM-Solver) hold x_t itself: α = √ᾱ_t, σ = √(1−ᾱ_t), var = 1;
        VE samplers (Euler) hold x_t/√ᾱ_t = x_0 + σ_t·ε: α = 1, σ = σ_t, var = σ_t² + 1.
    The network saw the unit-variance x/√var and predicted (cfg.prediction_type)
        "epsilon"       ε:                          x̂_0 = (x − σ·ε)/α                 (Eq. 4 inverted)
        "v_prediction"  v = α̂·ε − σ̂·x_0 (Salimans & Ho 2022, §4; α̂, σ̂ = α, σ over √var):
                                                    x̂_0 = α·x/var − σ/√var·v,  ε̂ = α·v/√var + σ·x/var
                                                    (substitute x and v; α̂² + σ̂² = 1 cancels the cross terms)
        "sample"        x_0 itself:                 ε̂ = (x − α·x̂_0)/σ
    Each formula is written in the operation order of the diffusers scheduler it replaces (var = 1 and α = 1
    are exact no-ops in floating point), so every sampler stays bit-exact against diffusers."""
    if prediction_type == "epsilon":
        return (x - sigma * pred) / alpha, pred
    if prediction_type == "v_prediction":
        x0 = alpha * x / var - sigma / var ** 0.5 * pred
        eps = alpha * pred / var ** 0.5 + sigma * x / var
        return x0, eps
    if prediction_type == "sample":
        return pred, (x - alpha * pred) / sigma
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


class NoiseSchedule:
    """The forward process q(x_t | x_0) of one model and the conversions between its parameterisations.

    `t` arguments are ints or integer tensors of shape (B,); the per-timestep numbers are gathered
    and broadcast over the remaining dimensions of x, e.g. (B,) -> (B, 1, 1, 1) for latents.
    """

    def __init__(self, cfg: ScheduleConfig, zero_terminal_snr: bool = False):
        self.cfg = cfg
        self.prediction_type = cfg.prediction_type
        self._tables = {}  # (table, device, dtype) -> the table there, for _at
        betas = make_betas(cfg)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas                                           # (T,) β_t
        self.alphas = 1.0 - betas                                    # (T,) α_t
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)      # (T,) ᾱ_t
        # σ_t of the variance-exploding view; infinite at t = T−1 under zero terminal SNR.
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5

    @property
    def num_train_timesteps(self) -> int:
        return len(self.betas)

    def _at(self, values: torch.Tensor, t, x: torch.Tensor) -> torch.Tensor:
        """values[t] in x's dtype/device, shaped to broadcast against x."""
        # Cast the whole table first, then gather: the order diffusers uses in add_noise.
        key = (id(values), x.device, x.dtype)
        hit = self._tables.get(key)
        if hit is None or hit[0] is not values:  # one host->device copy per table, device and dtype, not one per
            hit = self._tables[key] = (values, values.to(device=x.device, dtype=x.dtype))  # call (each would sync)
        v = hit[1][torch.as_tensor(t, device=x.device)]
        return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """Sample q(x_t | x_0), Eq. (4) of Ho et al. 2020: x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε."""
        ab = self._at(self.alphas_cumprod, t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """v_t = √ᾱ_t·ε − √(1−ᾱ_t)·x_0 (Salimans & Ho 2022): d x_t / dφ for x_t = cos φ·x_0 + sin φ·ε."""
        ab = self._at(self.alphas_cumprod, t, x0)
        return ab.sqrt() * noise - (1 - ab).sqrt() * x0

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """What the network is trained to output at x_t: ε, v or x_0 (cfg.prediction_type)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.velocity(x0, noise, t)
        if self.prediction_type == "sample":
            return x0
        raise ValueError(f"unknown prediction_type {self.prediction_type!r}")

    # ------------------------------------------------------------------ parameterisations
    def denoise(self, pred: torch.Tensor, x_t: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂_0, ε̂) implied by the network output `pred` at (x_t, t): `denoise` with α = √ᾱ_t, σ = √(1−ᾱ_t)."""
        ab = self._at(self.alphas_cumprod, t, x_t)
        return denoise(pred, x_t, ab.sqrt(), (1 - ab).sqrt(), self.prediction_type)

    def to_x0(self, pred: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """The x_0 implied by the network output `pred` at (x_t, t) (see `denoise`)."""
        return self.denoise(pred, x_t, t)[0]

    def to_eps(self, pred: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """The ε implied by the network output `pred` at (x_t, t) (see `denoise`)."""
        return self.denoise(pred, x_t, t)[1]

    def snr(self, t) -> torch.Tensor:
        """SNR_t = ᾱ_t / (1 − ᾱ_t), e.g. for Min-SNR-γ loss weighting (Hang et al. 2023)."""
        ab = self.alphas_cumprod[torch.as_tensor(t)]
        return ab / (1 - ab)

    # ------------------------------------------------------------------ checkpoint buffers
    def ldm_buffers(self) -> dict[str, torch.Tensor]:
        """The 12 schedule buffers of a CompVis `LatentDiffusion` state dict (SD1.x/2.x single files).

        CompVis computes them in float64 from its own betas and rounds each to float32 once, so
        they differ from our float32 table in the last bits (relative ~1e-6). The posterior
        q(x_{t−1} | x_t, x_0) = N(coef1·x_0 + coef2·x_t, posterior_variance) is Eqs. 6-7 of Ho et al.
        """
        cfg = self.cfg
        T = cfg.num_train_timesteps
        if cfg.beta_schedule == "scaled_linear":
            betas = (torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, T, dtype=torch.float64) ** 2).numpy()
        else:
            betas = np.linspace(cfg.beta_start, cfg.beta_end, T, dtype=np.float64)
        alphas = 1.0 - betas
        ab = np.cumprod(alphas)
        ab_prev = np.append(1.0, ab[:-1])                 # ᾱ_{t−1}, with ᾱ_{−1} = 1
        post_var = betas * (1.0 - ab_prev) / (1.0 - ab)   # β̃_t, Eq. 7
        out = {
            "betas": betas,
            "alphas_cumprod": ab,
            "alphas_cumprod_prev": ab_prev,
            "sqrt_alphas_cumprod": np.sqrt(ab),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ab),
            "log_one_minus_alphas_cumprod": np.log(1.0 - ab),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ab),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ab - 1),
            "posterior_variance": post_var,
            # β̃_0 = 0: clip before the log so the first entry is finite.
            "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
            "posterior_mean_coef1": betas * np.sqrt(ab_prev) / (1.0 - ab),
            "posterior_mean_coef2": (1.0 - ab_prev) * np.sqrt(alphas) / (1.0 - ab),
        }
        return {k: torch.tensor(v, dtype=torch.float32) for k, v in out.items()}
