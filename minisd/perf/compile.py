"""torch.compile, applied from outside the chapters: each UNet block separately (sampling: sample.py --compile;
training: train.py --compile, which also compiles the VAE encoder).

What it changes: rounding order only. Inductor fuses the elementwise work around the matmuls and convolutions
(GroupNorm + SiLU, residual adds, dtype casts) into a few Triton (GPU) or C++ (CPU) kernels; fused code may round
an intermediate differently in the last bit, so results are close to, not bitwise equal to, the eager ones
(tests/test_graphs.py: 6 DDIM steps, latents within 3e-4 relative, pixels within 1/255; tests/test_train_compile.py).
The first call of each block and input shape compiles (minutes on a GPU box for SDXL); later calls are fast.
"""
from __future__ import annotations

from ..unet import UNetModel


def compile_unet_blocks(unet: UNetModel, mode: str = "default") -> UNetModel:
    """torch.compile each block of the U separately ("regional" compilation): Inductor fuses each block's
    norms, activations, residual adds and casts into a few Triton kernels, and compiling blocks instead of the
    whole network keeps the compile short (repeated blocks of one shape share a graph) and works with gradient
    checkpointing, which calls blocks one by one. Same arithmetic up to rounding order (fused elementwise code
    may round differently in the last bit). The first call of each block and input shape compiles (on an H100
    box with 16 cores, about a minute for SDXL); later calls of those shapes are fast. Returns the UNet."""
    import torch._dynamo
    # Static shapes, one graph per (block, shape): every block of a class shares one code object, so the
    # per-code recompile limit (default 8) must cover all of them, or the rest silently run eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, 4096)
    blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks, unet.out]
    for b in blocks:
        if b is not None:
            b.compile(mode=mode, dynamic=False)
    return unet


def compile_for_training(model, encoder: bool = True, mode: str = "default") -> None:
    """--compile: each UNet block through torch.compile (`compile_unet_blocks`) and, when images are encoded in
    the step, the VAE encoder as one graph. Inductor fuses GroupNorm + SiLU, residual adds and dtype casts into a
    few kernels around the convolutions and matmuls, picks the convolutions' memory layout itself (fewer NCHW <->
    NHWC copies around cuDNN), and its partitioner recomputes fused elementwise results in backward instead of
    storing them (less activation memory). Same arithmetic up to rounding order. Every block and input shape
    compiles at its first call, so the first steps are slow (minutes on a GPU box). Measured on an H100 with
    --cuda-graph (bench/NOTES.md): SD1.5 LoRA bs8 141.8 -> 96.4 ms per step; SDXL LoRA 1024 bs1 154 -> 99.7 ms
    and 14.65 -> 11.89 GiB reserved."""
    compile_unet_blocks(model.unet, mode)
    if encoder:  # forward only (no grad), one fixed image shape
        model.vae.encoder.compile(mode=mode, dynamic=False)
