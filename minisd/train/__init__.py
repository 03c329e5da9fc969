"""Appendix: the training plumbing around the training step of trainer.py. Options (`config.py`: TrainConfig, from
TOML and flags), the captioned-image dataset and its loader (`data.py`), aspect-ratio buckets (`buckets.py`), latent
and text caches (`cache.py`), the EMA of the adapter weights (`ema.py`), validation images during a run
(`validation.py`), the optimizers beyond torch's: 8-bit AdamW (`adamw8bit.py`) and Prodigy (`prodigy.py`), and a
clean stop on Ctrl-C / SIGTERM at a step boundary with a checkpoint (`signals.py`).
"""
