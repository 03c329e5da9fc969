"""minisd: Stable Diffusion (SD1.x, SD2.x, SDXL, CompVis LDM-256) written from scratch in plain PyTorch.

The folder is the architecture diagram:
    config.py      dataclass configs and official presets
    tokenizer.py   CLIP BPE and BERT WordPiece tokenizers (on `tokenizers`)
    clip.py        CLIP / OpenCLIP text transformer        ldmbert.py  LDMBert (LDM-256)
    vae.py         AutoencoderKL                            unet.py     the UNet  (attention.py: its transformers)
    schedule.py    DDPM noise schedule                      samplers.py DDPM, DDIM, Euler, Euler a, DPM++ 2M
    model.py       the whole model, minisd folders          formats.py  official layouts in
    pipeline.py    text -> image, img2img
"""
__version__ = "0.1.0"
