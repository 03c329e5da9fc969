"""Textual inversion (Gal et al. 2022, "An Image is Worth One Word: Personalizing Text-to-Image Generation using
Textual Inversion"): teach the model a new word by learning only its input embedding. `train.py --method ti`.

A new token S* is added to each tokenizer as n new ids after the vocabulary (`--ti-token "<sks>" --ti-vectors n`),
each id with a vector v_i of the text encoder's width D; the captions contain S* ("a small <sks> emblem at the
center ..."). The whole model - UNet, VAE, text encoders and the rest of the embedding table - stays frozen; the
diffusion loss is minimised over the new vectors only (Eq. 2 of the paper):

    v* = argmin_v  E_{z, c, ε, t} ‖ε − ε_θ(z_t, t, c_θ(y; v))‖²

The vectors start from a word's embedding (`--ti-init circle`: v_i = E[w_{⌊i·m/n⌋}] for the init text's m token ids
w_0 .. w_{m−1}, A1111's rule for spreading a word over n vectors). Learnt vectors tend to grow far beyond the norm of
real words, which makes the token override the rest of the prompt; the optional regulariser (`--ti-norm-weight λ`)
pulls each vector's norm towards the vocabulary's mean norm μ:

    R(v) = λ · (1/n) Σ_i (‖v_i‖₂ − μ)²,    μ = (1/|V|) Σ_{j ∈ V} ‖E_j‖₂       (per text encoder; SDXL: summed)

added to the step's loss (so loss.jsonl shows loss + R). SDXL has one set of vectors per encoder (CLIP-L 768,
OpenCLIP bigG 1280), both trained. LDM-256's LDMBert (WordPiece, no added-token machinery here) is refused.

How only those rows train: the table itself stays frozen (its extra rows hold the init values), and a forward hook on
`token_embedding` replaces the output at positions of new ids with the trainable vectors. The optimizer never sees
the table, so every other row stays bit-for-bit what it was (weight decay, Adam's update of a zero gradient: none
of it reaches them). At the end the learnt vectors are written into the table's new rows too and saved as

    embedding.safetensors           A1111 / kohya: {"emb_params": [n, D]};
                                    SDXL {"clip_l": [n, 768], "clip_g": [n, 1280]}
    learned_embeds.safetensors      diffusers: {"<sks>": [n, D]} (SDXL: encoder 1's; learned_embeds_2.safetensors
                                    encoder 2's, as diffusers' textual_inversion_sdxl.py writes them)

`sample.py --embedding RUN/embedding.safetensors:"<sks>"` reads them (minisd/adapters/embeddings.py).
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from ..adapters.embeddings import _extend_embedding
from ..formats.safe_write import atomic_path


class TextualInversion:
    """The trainable vectors of one new token in every text encoder, hooked into the model. The interface the
    Trainer uses for a non-adapter method: `params`, `regulariser()`, `state_dict()`, `load_state_dict()`,
    `write_outputs()`, `describe()`, `train_text_encoder`."""

    train_text_encoder = True  # gradients must flow through the frozen text encoders to the vectors

    def __init__(self, model, token: str, n_vectors: int = 1, init: str = "circle", norm_weight: float = 0.0):
        if not all(hasattr(te, "text_model") and hasattr(tok, "add_embedding_token")
                   for te, tok in zip(model.text_encoders, model.tokenizers)):
            raise ValueError(f"--method ti needs CLIP text encoders; this {model.cfg.family} model's LDMBert has no "
                             "added-token machinery in minisd")
        self.model, self.token, self.n, self.norm_weight = model, token, n_vectors, norm_weight
        self.ids, self.params, self.mu, self.handles = [], [], [], []
        for tok, te in zip(model.tokenizers, model.text_encoders):
            emb = te.text_model.embeddings.token_embedding
            table = emb.weight.detach()
            init_ids = tok.prompt_tokens(init)
            if not init_ids:
                raise ValueError(f"--ti-init {init!r} gives no tokens")
            # A1111: vector i from init token ⌊i·m/n⌋ (a one-token word is copied into every vector)
            init_vecs = table[[init_ids[i * len(init_ids) // n_vectors] for i in range(n_vectors)]].float()  # (n, D)
            self.mu.append(table.float().norm(dim=1).mean().item())                 # μ: the vocabulary's mean norm
            ids = tok.add_embedding_token(token, n_vectors)  # ValueError if the token is already a word
            if ids != list(range(ids[0], ids[0] + n_vectors)):
                raise ValueError(f"token {token!r} got non-consecutive ids {ids}")
            _extend_embedding(te, init_vecs, ids)  # the table grows by n frozen rows (the init values)
            vec = nn.Parameter(init_vecs.clone().to(table.device))                 # (n, D) fp32, the only trainable
            self.ids.append(ids)
            self.params.append(vec)
            self.handles.append(te.text_model.embeddings.token_embedding.register_forward_hook(
                _splice(vec, ids[0], n_vectors)))

    # ------------------------------------------------------------------------------------------- training
    def regulariser(self) -> torch.Tensor | float:
        """R(v) = λ · (1/n) Σ_i (‖v_i‖ − μ)², summed over the text encoders (module docstring); 0 when λ = 0."""
        if not self.norm_weight:
            return 0.0
        return self.norm_weight * sum(((v.norm(dim=1) - mu) ** 2).mean() for v, mu in zip(self.params, self.mu))

    def state_dict(self) -> dict:
        return {f"ti.{i}": v.detach().clone() for i, v in enumerate(self.params)}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():  # in place: the optimizer holds these tensors
            for i, v in enumerate(self.params):
                v.copy_(state[f"ti.{i}"])

    def describe(self) -> str:
        widths = " + ".join(str(v.shape[1]) for v in self.params)
        return (f"textual inversion: token {self.token!r}, {self.n} vector(s) of width {widths}, "
                f"{sum(v.numel() for v in self.params):,} trainable parameters"
                + (f", norm regulariser λ {self.norm_weight} (μ {', '.join(f'{m:.3f}' for m in self.mu)})"
                   if self.norm_weight else ""))

    # ------------------------------------------------------------------------------------------- files
    def write_into_table(self) -> None:
        """The learnt vectors into the embedding tables' new rows (the model then equals one loaded from a file)."""
        with torch.no_grad():
            for te, ids, v in zip(self.model.text_encoders, self.ids, self.params):
                w = te.text_model.embeddings.token_embedding.weight
                w[ids] = v.to(w.dtype)

    def file_tensors(self) -> dict:
        """{file name: tensors} of the two layouts (module docstring)."""
        vecs = [v.detach().float().cpu().contiguous() for v in self.params]
        if len(vecs) == 1:
            return {"embedding.safetensors": {"emb_params": vecs[0]},
                    "learned_embeds.safetensors": {self.token: vecs[0].clone()}}
        return {"embedding.safetensors": {"clip_l": vecs[0], "clip_g": vecs[1]},
                "learned_embeds.safetensors": {self.token: vecs[0].clone()},
                "learned_embeds_2.safetensors": {self.token: vecs[1].clone()}}

    def write_outputs(self, run_dir: str, metadata: dict, step: int = 0) -> dict:
        """Write the files (atomically); returns {name: path}."""
        from safetensors.torch import save_file
        self.write_into_table()
        out = {}
        meta = {**metadata, "minisd.token": self.token, "minisd.vectors": str(self.n)}
        for name, tensors in self.file_tensors().items():
            path = os.path.join(run_dir, name)
            with atomic_path(path) as tmp:  # a fresh private temporary file: never through a planted link
                save_file(tensors, tmp, metadata=meta)
            out[name.split(".")[0]] = path
        return out

    def files_text(self, out: dict) -> str:
        return (f"{out['embedding']} (A1111 / kohya), {out['learned_embeds']} (diffusers"
                + (", encoder 1; learned_embeds_2: encoder 2" if "learned_embeds_2" in out else "")
                + f"); use: python sample.py \"a {self.token} emblem\" --embedding {out['embedding']}:{self.token}")


def _splice(vec: nn.Parameter, first: int, n: int):
    """Forward hook of token_embedding: output rows whose id is first .. first+n−1 become vec[id − first]."""
    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        ids = args[0]                                                               # (B, T)
        new = (ids >= first) & (ids < first + n)                                    # (B, T)
        picked = vec[(ids - first).clamp(0, n - 1)].to(out.dtype)                   # (B, T, D)
        return torch.where(new[..., None], picked, out)
    return hook
