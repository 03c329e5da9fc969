"""minisd: Stable Diffusion (SD1.x, SD2.x, SDXL, CompVis LDM-256) written from scratch in plain PyTorch.

The folder is the architecture diagram: a book and its appendices. The chapters, in reading order:
    config.py      dataclass configs and the official presets they copy (SD1.5, SD2, SDXL, LDM-256, tiny)
    tokenizer.py   prompt -> token ids: CLIP's BPE and BERT's WordPiece (on `tokenizers`)
    clip.py        the CLIP / OpenCLIP text transformer (SD1, SD2, SDXL)
    ldmbert.py     LDMBert, the text encoder of LDM-256
    vae.py         AutoencoderKL: pixels <-> latents
    attention.py   cross-attention, GEGLU and the SpatialTransformer inside the UNet
    unet.py        the denoising UNet, one config-driven class for every family
    model.py       the whole model (UNet + VAE + text encoders + tokenizers) and the minisd folder
    schedule.py    the DDPM noise schedule, and the one denoiser: network output -> x̂_0, ε̂
    samplers.py    DDPM, DDIM, Euler, Euler ancestral, DPM-Solver++(2M)
    pipeline.py    text -> image and img2img with classifier-free guidance
    lora.py        LoRA and DoRA adapter layers
    trainer.py     fine-tuning: the training step and loop
The appendices, which a first reading can skip (chapters import only chapters):
    formats/       official layouts in and out: single files, diffusers folders, key tables, export, LoRA files
    adapters/      adapter machinery: injection, merge, extraction, LoHa / LoKr layers
    train/         training plumbing: options, data, buckets, caches, EMA, validation, optimizers, stopping
    perf/          speed and memory, applied from outside the chapters: CUDA graphs, compile, checkpointing,
                   VAE slicing / tiling, the profiler, cost estimates (each file says what it changes)
    world/         the embedded procedural world: dataset, probe, pretraining and recipes of minisd-tiny
tests/test_layout.py keeps this true.
"""
__version__ = "0.1.0"
