"""Appendix: the training plumbing around the training step of trainer.py. Options (`config.py`: TrainConfig, from
TOML and flags), the captioned-image dataset and its loader (`data.py`), aspect-ratio buckets (`buckets.py`), latent
and text caches (`cache.py`), the EMA of the adapter weights (`ema.py`), validation images during a run
(`validation.py`) and the optimizers beyond torch's: 8-bit AdamW (`adamw8bit.py`) and Prodigy (`prodigy.py`).
Beyond one GPU: data-parallel training under torchrun (`distributed.py`) and the optimizer step fused into the backward
(`fused.py`).
"""
