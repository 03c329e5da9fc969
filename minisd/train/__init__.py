"""Appendix: the training plumbing around the training step of trainer.py.

The run: options (`config.py`: TrainConfig; `cli.py`: read from flags, TOML, a resumed config.json; `values.py`:
value checks of flags and saved configs; `methods.py`: the methods' option checks), the loop (`loop.py`: Trainer),
the run folder made only after every check and locked (`run_folder.py`), a clean stop on Ctrl-C / SIGTERM at a
step boundary with a checkpoint (`signals.py`), validation images (`validation.py`) and the held-out validation
loss (`val_loss.py`).
Data: the captioned-image dataset and its loader (`data.py`), aspect-ratio buckets (`buckets.py`), latent and text
caches (`cache.py`). Optimisation: EMA of the trained weights (`ema.py`), 8-bit AdamW (`adamw8bit.py`), Prodigy
(`prodigy.py`), the step inside the backward (`fused.py`), data parallel over processes (`distributed.py`).
Methods besides adapters (`targets.py` picks the adapters' layers): full fine-tune (`full.py`), DreamBooth prior
preservation (`dreambooth.py`), textual inversion (`textual_inversion.py`), hypernetworks (`hypernetwork.py`),
what each adds to a checkpoint (`method_state.py`), and knowledge distillation by block removal (`distill.py`:
recipes, loss, hooks; `distill_loop.py`: the teacher / student run of train.py --distill).
"""
