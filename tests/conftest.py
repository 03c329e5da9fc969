"""Shared test helpers. Tier 1 of the test plan: tiny random reference models vs minisd."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# Facts about the official checkpoints (tensor names, shapes, configs; no weights), kept in the repository so a
# fresh clone runs its tests alone: tests/reference/README.md says where each file comes from.
REFERENCE = os.path.join(ROOT, "tests", "reference")
CLIP_VOCAB = os.path.join(ROOT, "weights", "tokenizers", "clip")
BERT_VOCAB = os.path.join(ROOT, "weights", "tokenizers", "bert")


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Give every parameter non-trivial random values (zero-initialised output layers and
    unit norm weights would hide mapping bugs). Norm weights stay near 1 so activations stay sane."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)
    return module.eval()   # reference models are built in train mode: dropout would make them random


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _sample_threads(request, monkeypatch):
    """sample.py's --threads default follows the machine's load (minisd/perf/threads.py), so two in-process calls
    on a machine whose load changes could pick different counts and differ in the last bit. Tests compare bits
    across calls: in-process, the default is the 1 thread the tests run at. test_threads checks the rule itself;
    a test may patch this again to check what sample.py does with another count."""
    if request.module.__name__ != "test_threads":
        from minisd.perf import threads
        monkeypatch.setattr(threads.LoadWindow, "threads", lambda self: 1)


def save_tiny_sdxl(path) -> str:
    """A tiny random SDXL (two text encoders, pooled + size conditioning) saved as a minisd folder; returns the path."""
    from minisd.config import CLIPTextConfig, ModelConfig, ScheduleConfig, UNetConfig, VAEConfig
    from minisd.model import StableDiffusion, save_model
    te = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, layer=-2,
              final_norm=False)
    cfg = ModelConfig(family="sdxl", unet=UNetConfig(
        model_channels=32, channel_mult=(1, 2), num_res_blocks=(1, 1), transformer_depth=(0, 1),
        transformer_depth_middle=1, num_head_channels=8, context_dim=64, use_linear_in_transformer=True,
        adm_in_channels=32 + 6 * 8, addition_time_embed_dim=8, norm_num_groups=8),
        vae=VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_num_groups=8, scale_factor=0.13025),
        text_encoders=[CLIPTextConfig(**te), CLIPTextConfig(**te, hidden_act="gelu", projection_dim=32, pad_token="!")],
        schedule=ScheduleConfig(timestep_spacing="leading"), resolution=32, zero_empty_negative=True)
    torch.manual_seed(0)
    save_model(StableDiffusion(cfg), str(path))
    return str(path)


def kill_at(trainer, step: int) -> None:
    """Run `trainer` until it is about to take step `step`, then stop it as a SIGKILL would (nothing more written)."""
    real_step = trainer.train_step

    def dying_step():
        if trainer.step == step:
            raise KeyboardInterrupt
        return real_step()
    trainer.train_step = dying_step
    with pytest.raises(KeyboardInterrupt):
        trainer.run()


def killed_and_resumed(make, saved_step: int = 2, kill_step: int = 3):
    """An uninterrupted run `make("full")` and a run `make("part")` killed before step `kill_step`, then built again
    and resumed from its checkpoint of step `saved_step` (asserted). Returns (full trainer, its losses, resumed
    trainer, its losses): the caller compares them and whatever its method keeps."""
    full = make("full")
    losses = full.run()["losses"]
    kill_at(make("part"), kill_step)
    again = make("part")
    again.load_checkpoint()
    assert again.step == saved_step
    return full, losses, again, again.run()["losses"]
