"""What the fine-tuning methods of issue 17 add to a checkpoint besides optimizer and RNGs (`trainable_state` /
`load_trainable_state`: the adapter, or the fully fine-tuned weights, and DreamBooth's class loader) and to a
loss.jsonl line (`extend_record`: the prior term and the validation loss). Option checks: methods.py.
"""
from __future__ import annotations


def trainable_state(trainer) -> dict:
    """What a checkpoint holds of the trained tensors and the methods' own data positions."""
    from .. import adapters
    if trainer.cfg.method == "full":
        from .full import trained_state_dict
        state = {"weights": trained_state_dict(trainer)}
    else:
        state = {"adapter": adapters.adapter_state_dict(trainer.model)}
    if trainer.prior is not None:
        state["prior_loader"] = trainer.prior.loader.state_dict()
    return state


def load_trainable_state(trainer, s: dict) -> None:
    """The inverse of `trainable_state`, in place (the optimizer holds references to the tensors)."""
    from .. import adapters
    if trainer.cfg.method == "full":
        if "weights" not in s:
            raise ValueError(f"{trainer.run_dir}: the checkpoint holds no full fine-tune weights (another --method)")
        from .full import load_trained_state_dict
        load_trained_state_dict(trainer, s["weights"])
    else:
        if "adapter" not in s:
            raise ValueError(f"{trainer.run_dir}: the checkpoint holds no adapter (another --method)")
        adapters.load_adapter_state_dict(trainer.model, s["adapter"], inject=False)
    if trainer.prior is not None:
        trainer.prior.loader.load_state_dict(s["prior_loader"])


def extend_record(trainer, record: dict) -> None:
    """Add the methods' numbers to a step's loss.jsonl line: the prior term (DreamBooth) and the validation loss on
    its steps (computed here: it changes no random stream)."""
    if trainer.prior is not None:
        record["prior_loss"] = trainer.prior.step_mean()
    if trainer.val_loss is not None and trainer.step % trainer.cfg.val_loss_every == 0:
        record["val_loss"] = trainer.val_loss()
