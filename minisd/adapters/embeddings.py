"""Textual-inversion embeddings (Gal et al. 2022): new "words" whose input vectors were learnt, the text encoder unchanged.

A TI file holds n vectors of the text encoder's width for one token; using the token in a prompt puts those n vectors
where its word embeddings would go. Nothing else in the model changes, so an embedding works with any LoRA.

    file layout                                               read as
    A1111 / kohya SD1-2   .safetensors {"emb_params": [n, D]}       the only encoder
    A1111 .pt             {"string_to_param": {"*": [n, D]}, "name": ...}   (torch.load, weights_only=True)
    SDXL (kohya, diffusers adv. scripts)  {"clip_l": [n, 768], "clip_g": [n, 1280]}   encoder 1, encoder 2
    diffusers             learned_embeds.safetensors {"<token>": [D] or [n, D]}  the only encoder (or by width)

The token is the file's stem (A1111's rule) unless given; a multi-vector token is spelled `tok tok_1 ... tok_{n-1}` in
the prompt before tokenizing (diffusers' convention), so n new ids follow the vocabulary. The vectors go into a
token-embedding table extended by n rows per encoder (the stored weights are not written).
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from ..formats.lora_read import AdapterError, read_tensors


def read_embedding(path: str) -> dict[str, torch.Tensor]:
    """{"clip_l" / "clip_g" / "" (the only encoder): [n, D] fp32} of a TI file."""
    if path.endswith((".pt", ".bin", ".ckpt")):
        if not os.path.isfile(path):
            raise AdapterError(f"{path}: " + ("not a regular file" if os.path.exists(path) else "no such file"))
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise AdapterError(f"{path}: refused or unreadable file ({str(e).splitlines()[0]})") from None
    else:
        raw, _ = read_tensors(path)
    if isinstance(raw, dict) and isinstance(raw.get("string_to_param"), dict):  # A1111 .pt
        vecs = list(raw["string_to_param"].values())
        if len(vecs) != 1:
            raise AdapterError(f"{path}: string_to_param holds {len(vecs)} tokens, expected 1")
        raw = {"": vecs[0]}
    if not isinstance(raw, dict) or not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise AdapterError(f"{path}: not a textual-inversion embedding")
    if "emb_params" in raw:
        raw = {"": raw["emb_params"]}
    elif not ({"clip_l", "clip_g"} & set(raw)):
        if len(raw) != 1:
            raise AdapterError(f"{path}: {len(raw)} tensors ({', '.join(list(raw)[:3])}): not a textual-inversion "
                               "embedding (expected emb_params, clip_l/clip_g, string_to_param or one token)")
        raw = {"": next(iter(raw.values()))}
    out = {}
    for k, v in raw.items():
        v = v.detach().float()
        v = v[None] if v.ndim == 1 else v
        if v.ndim != 2:
            raise AdapterError(f"{path}: {k or 'embedding'} has shape {tuple(v.shape)}, expected [vectors, width]")
        out[k] = v
    return out


def _extend_embedding(te: nn.Module, vectors: torch.Tensor, ids: list[int]) -> None:
    """Token table of `te` with rows `ids` set to `vectors` (grown as needed; a new Parameter, the old untouched)."""
    emb = te.text_model.embeddings.token_embedding
    old = emb.weight
    size = max(max(ids) + 1, old.shape[0])
    new = torch.zeros(size, old.shape[1], dtype=old.dtype, device=old.device)
    new[: old.shape[0]] = old.detach()
    new[ids] = vectors.to(new.dtype).to(new.device)
    emb.weight = nn.Parameter(new, requires_grad=False)
    emb.num_embeddings = size


def load_embedding(model, path: str, token: str | None = None) -> tuple[str, int]:
    """Make `token` (default: the file's stem) mean the file's vectors in every text encoder it has vectors for.
    Returns (token, vectors per encoder). Raises AdapterError for a file that does not fit the model."""
    vecs = read_embedding(path)
    token = token or os.path.splitext(os.path.basename(path))[0]
    widths = [te.cfg.hidden_size if hasattr(te, "cfg") else None for te in model.text_encoders]
    if not all(hasattr(te, "text_model") for te in model.text_encoders):
        raise AdapterError(f"{path}: textual inversion needs CLIP text encoders, this {model.cfg.family} model "
                           "has none")
    if "" in vecs:
        if len(widths) != 1:
            raise AdapterError(f"{path}: one set of vectors (width {vecs[''].shape[1]}) for a {len(widths)}-encoder "
                               "model: SDXL embeddings carry clip_l and clip_g")
        per_encoder = [vecs[""]]
    else:
        if len(widths) != 2:
            raise AdapterError(f"{path}: an SDXL embedding (clip_l / clip_g), the model is {model.cfg.family}")
        missing = [k for k in ("clip_l", "clip_g") if k not in vecs]
        if missing:
            raise AdapterError(f"{path}: {missing[0]} is missing")
        per_encoder = [vecs["clip_l"], vecs["clip_g"]]
    n = per_encoder[0].shape[0]
    for i, (v, w) in enumerate(zip(per_encoder, widths)):
        if v.shape[1] != w or v.shape[0] != n:
            raise AdapterError(f"{path}: vectors {tuple(v.shape)} do not fit text encoder {i + 1} (width {w}; a "
                               "file for another base model?)")
    for tok, te, v in zip(model.tokenizers, model.text_encoders, per_encoder):
        try:
            ids = tok.add_embedding_token(token, n)
        except ValueError as e:
            raise AdapterError(f"{path}: {e}") from None
        _extend_embedding(te, v, ids)
    return token, n
