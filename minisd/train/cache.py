"""Latent and text-embedding caches: run the frozen VAE encoder and text encoder(s) once per image / caption.

Both networks are frozen (trainer.py says why), so their outputs for a given image and caption never change;
computing them every step only costs time and device memory. `--cache-latents` and `--cache-text` compute them
once before the first step (with a progress bar) and look them up afterwards.

What is cached, and why it keeps the recipe of uncached training:

    latents   the VAE posterior moments (mean, logvar) of q(z|x), shape (2C, h, w) per image, not a sample z:
              each step still draws z_0 = mean + exp(½·logvar)·ε from the trainer's generator, the same draw
              in the same order as uncached training, so the losses match it up to float rounding (the VAE
              batches differ: caching groups images by shape, training by step). With --flip both orientations
              are cached (the VAE is not mirror-equivariant) and each item uses the dataset's own flip decision;
              a random crop cannot be cached (TrainConfig refuses --random-crop with --cache-latents).
    text      context (T, D) and, for SDXL, the pooled embedding (P) of every caption, computed under the
              training autocast dtype, plus the empty caption's: a sample the dataset drops (--caption-dropout)
              gets the "" row, by the dataset's own per-item decision. Refused with --train-text-encoder.
    geometry  SDXL's micro-conditioning (original size, crop offset, target size) is not cached: the dataset
              computes it from each real image's size (read once when the dataset is built) and its crop target.

In memory by default. With --cache-dir the caches are safetensors files there (`latents.safetensors`,
`text.safetensors`), each with a fingerprint in its metadata: a hash of the encoder weights (and autocast dtype),
the image files' bytes and crop targets (resolution, buckets) or the captions' token ids. A later run reuses a
file only when its fingerprint equals the one it computes; otherwise the cache is recomputed and replaced - a stale
or damaged cache, never a link or a safetensors file without a cache fingerprint (someone's weights), which are
refused before the run starts (`check_cache_dir`). Files are written through formats/safe_write.py (a fresh private temporary
file renamed into place: never through a planted link, never half-written).

Shapes: N = examples, C = latent channels, h, w = latent size, T = tokens, D = text width, P = pooled width.
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import nullcontext

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..formats.safe_write import WriteError, atomic_path, check_parent
from ..vae import DiagonalGaussian

VERSION = 1  # bump when what a cache file holds changes, so old files are recomputed
CACHE_FILES = ("latents.safetensors", "text.safetensors")


class LatentCache:
    """VAE posterior moments per (example, flipped)."""

    def __init__(self, moments: dict[tuple[int, bool], torch.Tensor]):
        self.moments = moments  # (k, flip) -> (2C, h, w) in the VAE's dtype, CPU

    def lookup(self, indices: list[int], flips: list[bool], device) -> DiagonalGaussian:
        """The posterior q(z|x) of a batch, as `vae.encode` would return it."""
        return DiagonalGaussian(self.moments_of(indices, flips).to(device))

    def moments_of(self, indices: list[int], flips: list[bool]) -> torch.Tensor:
        """The stored moments of a batch, (B, 2C, h, w) on the CPU."""
        return torch.stack([self.moments[(k, bool(f))] for k, f in zip(indices, flips)])


class TextCache:
    """Text-encoder outputs per example; the last row is the empty caption's."""

    def __init__(self, context: torch.Tensor, pooled: torch.Tensor | None):
        self.context, self.pooled = context, pooled  # (N + 1, T, D), (N + 1, P) or None
        self.empty = context.shape[0] - 1

    def lookup(self, indices: list[int], dropped: list[bool], device):
        """(context (B, T, D), pooled (B, P) or None) of a batch; dropped captions read the "" row."""
        rows = torch.tensor([self.empty if d else k for k, d in zip(indices, dropped)])
        pooled = None if self.pooled is None else self.pooled[rows].to(device)
        return self.context[rows].to(device), pooled


# ----------------------------------------------------------------------------------------------- fingerprints
def module_digest(module: torch.nn.Module) -> str:
    """Hash of every tensor's name, shape, dtype and bytes: any change of the weights changes it."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in module.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())  # raw bytes, bf16 too
    return h.hexdigest()


def file_digest(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(parts: dict) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=16).hexdigest()


def read_cache(path: str, fp: str, log) -> dict | None:
    """The tensors of a cache file whose fingerprint is `fp`; None (and why) when absent, stale or damaged."""
    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, "pt") as f:
            stored = (f.metadata() or {}).get("fingerprint")
        if stored == fp:
            return load_file(path)
        log(f"cache: {path} was made for another model, data or resolution: recomputing it")
    except Exception as e:  # safetensors raises several error types for damaged files
        log(f"cache: {path} is unreadable ({str(e).splitlines()[0]}): recomputing it")
    return None


def is_foreign_file(path: str) -> bool:
    """A file at a cache name that is not minisd's to replace: a link, not a regular file, or a readable safetensors
    file without a cache fingerprint (someone's weights). A damaged file is taken for a damaged cache (recomputed)."""
    if os.path.islink(path) or not os.path.isfile(path):
        return True
    try:
        with safe_open(path, "pt") as f:
            return "fingerprint" not in (f.metadata() or {})
    except Exception:  # damaged or not safetensors: nothing a reader could use, the cache that was there
        return False


def check_cache_dir(folder: str | None) -> None:
    """Before the run: --cache-dir is a folder (or can be made) and holds at the cache names only minisd caches,
    which it may replace; anything else there is the user's (WriteError, one line)."""
    if not folder:
        return
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise WriteError(f"--cache-dir {folder} is a file; a folder is needed")
    check_parent(os.path.join(folder, CACHE_FILES[0]))
    for name in CACHE_FILES:
        p = os.path.join(folder, name)
        if os.path.lexists(p) and is_foreign_file(p):
            raise WriteError(f"--cache-dir: {p} exists and is not a minisd cache; it is never replaced (move it, or "
                             "choose another --cache-dir)")


def write_cache(path: str, tensors: dict, fp: str, what: str) -> None:
    """Write through a fresh private temporary file renamed into place, so a killed run never leaves half a cache
    and a planted link is never written through; a file there that is not a minisd cache is never replaced."""
    if os.path.lexists(path) and is_foreign_file(path):
        raise WriteError(f"{path} exists and is not a minisd cache; it is never replaced")
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"fingerprint": fp, "minisd": what})


# ----------------------------------------------------------------------------------------------- building
def cache_latents(trainer) -> LatentCache:
    """Encode every example (both orientations with --flip) once; afterwards the dataset reads no pixels."""
    ds, vae, cfg = trainer.data, trainer.model.vae, trainer.cfg
    flips = (False, True) if ds.flip_prob > 0 else (False,)
    keys = [(k, f) for k in range(len(ds.examples)) for f in flips]
    name = lambda key: f"{key[0]}.flip" if key[1] else str(key[0])  # noqa: E731
    path = fp = None
    if cfg.cache_dir:
        path = os.path.join(cfg.cache_dir, "latents.safetensors")
        fp = fingerprint({"kind": "latents", "version": VERSION, "vae": module_digest(vae), "flips": len(flips),
                          "tiling": [vae.tiling, vae.tile_latent, vae.tile_overlap] if getattr(vae, "tiling", False)
                          else False,  # perf/vae_memory.py's settings, where set
                          "images": [[os.path.abspath(ex.path), file_digest(ex.path), *ds.targets[k]]
                                     for k, ex in enumerate(ds.examples)]})
        stored = read_cache(path, fp, trainer.log)
        if stored is not None:
            trainer.log(f"cache: {len(keys)} latents read from {path}")
            ds.load_pixels = False
            return LatentCache({key: stored[name(key)] for key in keys})
    # one VAE call per chunk of same-shape images (buckets), at most a training batch at a time
    keys.sort(key=lambda key: ds.targets[key[0]])
    chunks, B = [], cfg.batch_size
    for key in keys:
        if chunks and len(chunks[-1]) < B and ds.targets[chunks[-1][0][0]] == ds.targets[key[0]]:
            chunks[-1].append(key)
        else:
            chunks.append([key])
    moments = {}
    from tqdm import tqdm
    with torch.no_grad(), tqdm(total=len(keys), desc="cache latents", unit="img", disable=not cfg.progress) as bar:
        for chunk in chunks:
            x = torch.stack([ds.load(k, f) for k, f in chunk]).to(trainer.device, trainer.vae_dtype)  # (b, 3, H, W)
            # kept in the VAE's dtype: DiagonalGaussian.sample draws ε in that dtype, as uncached training does
            m = vae.encode(x).moments.cpu()                                                   # (b, 2C, h, w)
            moments.update({key: mk.clone() for key, mk in zip(chunk, m)})
            bar.update(len(chunk))
    if path:
        write_cache(path, {name(key): v for key, v in moments.items()}, fp,
                    "VAE posterior moments (mean, logvar) per image, '<k>.flip' = mirrored")
        trainer.log(f"cache: wrote {len(keys)} latents to {path}")
    ds.load_pixels = False
    return LatentCache(moments)


def cache_text(trainer) -> TextCache:
    """Encode every example's caption and the empty caption once, under the training autocast dtype."""
    ds, m, cfg = trainer.data, trainer.model, trainer.cfg
    captions = [ex.caption for ex in ds.examples] + [""]
    path = fp = None
    if cfg.cache_dir:
        path = os.path.join(cfg.cache_dir, "text.safetensors")
        tokens = hashlib.blake2b(digest_size=16)
        for ids in m.tokenize(captions):  # token ids cover both the captions and the tokenizer
            tokens.update(ids.to(torch.int64).numpy())
        fp = fingerprint({"kind": "text", "version": VERSION, "amp": str(trainer.amp_dtype),
                          "encoders": [module_digest(te) for te in m.text_encoders], "tokens": tokens.hexdigest()})
        stored = read_cache(path, fp, trainer.log)
        if stored is not None and stored["context"].shape[0] == len(captions):
            trainer.log(f"cache: {len(captions)} caption embeddings read from {path}")
            return TextCache(stored["context"], stored.get("pooled"))
    amp = (torch.autocast(trainer.device.type, dtype=trainer.amp_dtype) if trainer.amp_dtype else nullcontext())
    ctx, pooled, B = [], [], cfg.batch_size
    from tqdm import tqdm
    with torch.no_grad(), amp, tqdm(total=len(captions), desc="cache text", unit="caption",
                                    disable=not cfg.progress) as bar:
        for i in range(0, len(captions), B):
            c, p = trainer.encode_text(captions[i:i + B])   # the step's own text path: model.encode_text
            ctx.append(c.cpu())                              # (b, T, D)
            if p is not None:
                pooled.append(p.cpu())                       # (b, P)
            bar.update(len(captions[i:i + B]))
    cache = TextCache(torch.cat(ctx), torch.cat(pooled) if pooled else None)
    if path:
        tensors = {"context": cache.context, **({"pooled": cache.pooled} if pooled else {})}
        write_cache(path, tensors, fp, "text-encoder context (+ pooled) per caption; last row = empty caption")
        trainer.log(f"cache: wrote {len(captions)} caption embeddings to {path}")
    return cache


def build_caches(trainer) -> tuple[LatentCache | None, TextCache | None]:
    """The caches the config asks for (None where not asked)."""
    cfg = trainer.cfg
    latents = cache_latents(trainer) if cfg.cache_latents else None
    text = cache_text(trainer) if cfg.cache_text else None
    return latents, text


def offload_cached(trainer) -> None:
    """Move the networks the training loop no longer runs (the VAE with cached latents, the text encoders with
    cached text) off the accelerator: their memory goes to the UNet's activations. They come back when needed:
    `Pipeline` (sample grids, validation images) moves the whole model to its device."""
    if trainer.device.type == "cpu":
        return
    m = trainer.model
    if trainer.latent_cache is not None:
        m.vae.to("cpu")
    if trainer.text_cache is not None:
        for te in m.text_encoders:
            te.to("cpu")
    if trainer.device.type == "cuda":
        torch.cuda.empty_cache()
