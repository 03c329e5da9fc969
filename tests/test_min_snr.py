"""Min-SNR-γ loss weights (minisd.trainer.min_snr_weight), checked against values worked out by hand from
Hang et al. 2023: ε-loss weight min(SNR, γ)/SNR, v-loss weight min(SNR, γ)/(SNR + 1); at SNR = 0 (zero terminal
SNR, Lin et al. 2024) the ε weight is its limit 1 (not 0/0 = NaN) and the v weight its value 0."""
import torch

from minisd.config import ScheduleConfig
from minisd.schedule import NoiseSchedule
from minisd.trainer import min_snr_weight

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_weights_by_hand():
    # SNR = 0 (the last step under zero terminal SNR), below γ, exactly γ, above γ; two γ so that γ is not a
    # constant of the formula. Every value below is exact in float32 (quotients of small integers rounded
    # once), so the comparison is exact.
    snr = torch.tensor([0.0, 0.25, 2.0, 5.0, 20.0])
    hand = {  # (γ, prediction): weights
        (5.0, "epsilon"): [1.0, 1.0, 1.0, 1.0, 5 / 20],
        (2.0, "epsilon"): [1.0, 1.0, 1.0, 2 / 5, 2 / 20],
        (5.0, "v_prediction"): [0.0, 0.25 / 1.25, 2 / 3, 5 / 6, 5 / 21],
        (2.0, "v_prediction"): [0.0, 0.25 / 1.25, 2 / 3, 2 / 6, 2 / 21],
    }
    for (gamma, pred), w in hand.items():
        got = min_snr_weight(snr, gamma, pred)
        assert torch.equal(got, torch.tensor(w, dtype=torch.float32)), (gamma, pred, got.tolist(), w)


def test_zero_terminal_snr_schedule_gives_finite_weights():
    """Every timestep of an SD schedule rescaled to zero terminal SNR: finite weights in [0, 1]; the last step
    (SNR exactly 0) weighs 1 for ε; the ε-weighted loss of that step equals its plain MSE, not NaN."""
    s = NoiseSchedule(ScheduleConfig(**SD), zero_terminal_snr=True)
    t = torch.arange(s.num_train_timesteps)
    snr = s.snr(t)
    assert snr[-1].item() == 0.0 and (snr[:-1] > 0).all()
    for pred in ("epsilon", "v_prediction"):
        w = min_snr_weight(snr, 5.0, pred)
        assert torch.isfinite(w).all() and (w >= 0).all() and (w <= 1).all(), pred
    w_eps = min_snr_weight(snr, 5.0, "epsilon")
    assert w_eps[-1].item() == 1.0
    # ε weight is 1 wherever SNR ≤ γ, γ/SNR elsewhere (the first, nearly clean steps)
    assert torch.equal(w_eps[snr <= 5.0], torch.ones(int((snr <= 5.0).sum())))
    assert torch.equal(w_eps[snr > 5.0], torch.tensor(5.0) / snr[snr > 5.0])  # (5.0 / x is 5·(1/x) in torch)
    # one step at t = T−1 with a wrong prediction: the weighted per-sample loss is the plain MSE
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(2, 4, 3, 5, generator=g), torch.randn(2, 4, 3, 5, generator=g)
    tt = torch.tensor([999, 999])
    zt = s.q_sample(z0, eps, tt)
    assert torch.equal(zt, eps)                    # ᾱ = 0: x_T is pure noise
    pred = 0.5 * zt                                # some ε̂
    per = ((pred - eps) ** 2).mean(dim=(1, 2, 3))
    weighted = per * min_snr_weight(s.snr(tt), 5.0, "epsilon")
    assert torch.isfinite(weighted).all() and torch.equal(weighted, per)
