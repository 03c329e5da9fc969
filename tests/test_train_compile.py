"""train.py --compile (minisd/perf/compile.py `compile_for_training`): each UNet block and the VAE encoder through
torch.compile.

CPU: the flag compiles what it says (every UNet block; the encoder only when images are encoded in the step), and a
compiled run (Inductor's C++ backend) trains like the eager one. GPU (`-m gpu`): compiled + `--cuda-graph` runs, the
bench's fastest training path, train like eager ones."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from minisd import world  # noqa: E402
from minisd.adapters import adapter_state_dict  # noqa: E402
from minisd.train.cli import parse_config  # noqa: E402
from minisd.train.loop import Trainer  # noqa: E402

FAST = ["--model", "tiny-random", "--threads", "1", "--no-progress", "--batch-size", "2", "--no-samples",
        "--save-every", "0"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return world.write_folder(str(tmp_path_factory.mktemp("world")), 4, seed=0, style="striped")


def compiled(module: torch.nn.Module) -> bool:
    return module._compiled_call_impl is not None        # what nn.Module.compile() sets


def _trainer(tmp_path, data_dir, name, flags):
    cfg, _ = parse_config(FAST + ["--data", data_dir, "--out", str(tmp_path / name), *flags])
    return Trainer(cfg, str(tmp_path / name), log=lambda s: None)


@pytest.mark.parametrize("flags, encoder", [([], True), (["--cache-latents"], False)])
def test_compile_flag_compiles_unet_blocks_and_encoder(tmp_path, data_dir, flags, encoder):
    t = _trainer(tmp_path, data_dir, "c", ["--compile", "--max-steps", "1", *flags])
    unet = t.model.unet
    blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks, unet.out]
    assert all(compiled(b) for b in blocks)
    assert compiled(t.model.vae.encoder) is encoder      # cached latents: the encoder never runs in a step
    assert not compiled(t.model.vae.decoder)
    plain = _trainer(tmp_path, data_dir, "p", ["--max-steps", "1", *flags])
    assert not any(compiled(b) for b in [*plain.model.unet.input_blocks, plain.model.vae.encoder])


def _run(tmp_path, data_dir, name, flags, steps):
    torch.manual_seed(0)
    t = _trainer(tmp_path, data_dir, name, ["--max-steps", str(steps), *flags])
    start = {k: v.float().cpu().clone() for k, v in adapter_state_dict(t.model).items()}
    losses = t.run()["losses"]
    end = {k: v.float().cpu() for k, v in adapter_state_dict(t.model).items()}
    return losses, {k: end[k] - start[k] for k in end}


def _relative_change_gap(a: dict, b: dict) -> float:
    """‖Δa − Δb‖ / ‖Δa‖ over all adapter tensors: how differently two runs moved the adapters."""
    num = sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5
    den = sum((a[k] ** 2).sum() for k in a) ** 0.5
    return float(num / den)


def test_compiled_run_trains_like_eager_on_cpu(tmp_path, data_dir):
    """fp32 on the CPU: Inductor's fused kernels change only the rounding order (~1e-7 relative), so 3 steps give
    the eager losses to 1e-4 and move the adapters the same way (AdamW's first steps are nearly sign(g), so an
    entry whose gradient is ~0 may move by lr either way; a compiled step that dropped a block's gradient or read
    stale inputs would differ by O(1)); measured 1.4e-5 on the dev VM, bound 1e-3."""
    eager_losses, eager_d = _run(tmp_path, data_dir, "eager", [], 3)
    comp_losses, comp_d = _run(tmp_path, data_dir, "compiled", ["--compile"], 3)
    for a, b in zip(eager_losses, comp_losses):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (eager_losses, comp_losses)
    gap = _relative_change_gap(eager_d, comp_d)
    print(f"compiled vs eager on the CPU: adapter change gap {gap:.2e}")
    assert gap <= 1e-3, gap


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_compiled_graph_run_trains_like_eager_on_gpu(tmp_path, data_dir, precision):
    """--compile --cuda-graph (compiled kernels recorded into the graph) against a plain eager run, 6 steps. fp32:
    only rounding order differs, losses to 1e-4. bf16: the fused kernels round intermediate bf16 values at other
    places than eager's op-by-op casts (~4e-3 relative each), so losses agree to 2e-2; the adapters' total moves
    within 10 % in bf16 and 2 % in fp32, against O(1) for a graph replaying stale inputs or a lost gradient."""
    flags = ["--device", "cuda", "--mixed-precision", precision]
    eager_losses, eager_d = _run(tmp_path, data_dir, "eager", flags, 6)
    comp_losses, comp_d = _run(tmp_path, data_dir, "compiled", flags + ["--compile", "--cuda-graph"], 6)
    tol, gap_tol = (1e-4, 2e-2) if precision == "no" else (2e-2, 1e-1)
    gap = _relative_change_gap(eager_d, comp_d)
    print(f"{precision}: losses {eager_losses} vs {comp_losses}; adapter change gap {gap:.2e}")
    for a, b in zip(eager_losses, comp_losses):
        assert abs(a - b) <= tol * max(1.0, abs(a)), (eager_losses, comp_losses)
    assert gap <= gap_tol, gap
