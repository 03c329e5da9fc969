"""Full-size parity on a GPU: official shapes, random weights, minisd vs diffusers / transformers.

For SD1.5, SD2.1-768-v, SDXL base and LDM-256 each component (UNet, VAE, text encoders) is built by
the reference library from the official config with random weights, its weights are mapped into
minisd through our name tables, and both run on the same inputs in fp32 (TF32 off). Prints a
markdown table (max abs diff, max abs diff / max |ref|, cosine similarity) and writes JSON.

    python tools/parity_full.py --out docs/parity.json        # needs ~40 GB of GPU memory at most
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from minisd.clip import CLIPTextModel  # noqa: E402
from minisd.config import LDM_256, SD2_V, SD15, SDXL_BASE  # noqa: E402
from minisd.formats.keys_text import clip_from_hf, ldmbert_from_diffusers  # noqa: E402
from minisd.formats.keys_unet import unet_config_from_diffusers, unet_from_diffusers  # noqa: E402
from minisd.formats.keys_vae import vae_from_diffusers  # noqa: E402
from minisd.ldmbert import LDMBert  # noqa: E402
from minisd.unet import UNetModel, sdxl_vector_cond  # noqa: E402
from minisd.vae import AutoencoderKL  # noqa: E402


def configs_dir() -> str:
    """The official configs: $MINISD_REFERENCE/configs, else tests/reference/configs of this checkout."""
    bases = [os.environ.get("MINISD_REFERENCE", ""), os.path.join(ROOT, "tests", "reference")]
    for base in bases:
        p = os.path.join(base, "configs")
        if base and os.path.isdir(p):
            return p
    raise SystemExit("error: tests/reference/configs not found (set MINISD_REFERENCE)")


def load_json(*parts):
    with open(os.path.join(configs_dir(), *parts)) as f:
        return json.load(f)


def compare(name, ours, ref):
    ours, ref = ours.double().flatten(), ref.double().flatten()
    diff = (ours - ref).abs().max().item()
    rel = diff / ref.abs().max().item()
    cos = torch.nn.functional.cosine_similarity(ours, ref, dim=0).item()
    return {"component": name, "max_abs": diff, "max_rel": rel, "cosine": cos, "numel": ref.numel(),
            "ref_absmax": ref.abs().max().item(), "ref_std": ref.std().item()}


def unet_case(label, cfg_path, preset, size, ctx_len=77, batch=2, dev="cuda"):
    from diffusers import UNet2DConditionModel
    d = load_json(*cfg_path)
    with torch.device(dev):
        ref = UNet2DConditionModel.from_config(d).eval()
    ucfg = unet_config_from_diffusers(d)
    assert ucfg == preset.unet, f"{label}: config from diffusers differs from our preset"
    with torch.device("meta"):
        ours = UNetModel(ucfg)
    ours.load_state_dict(unet_from_diffusers(ref.state_dict(), ucfg), strict=True, assign=True)
    ours.eval()
    g = torch.Generator(dev).manual_seed(0)
    x = torch.randn(batch, 4, size, size, device=dev, generator=g)
    t = torch.tensor([999.0, 321.0][:batch], device=dev)
    ctx = torch.randn(batch, ctx_len, ucfg.context_dim, device=dev, generator=g)
    kw, y = {}, None
    if ucfg.adm_in_channels:
        pooled = torch.randn(batch, 1280, device=dev, generator=g)
        time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * batch, device=dev)
        kw = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        y = sdxl_vector_cond(pooled, time_ids)
    with torch.no_grad():
        r = ref(x, t, encoder_hidden_states=ctx, **kw).sample
        o = ours(x, t, ctx, y=y)
    out = compare(f"{label} UNet ({sum(p.numel() for p in ours.parameters()) / 1e6:.0f}M)", o, r)
    del ref, ours
    return out


def vae_case(label, cfg_path, preset, dev="cuda"):
    from diffusers import AutoencoderKL as RefVAE
    d = load_json(*cfg_path)
    with torch.device(dev):
        ref = RefVAE.from_config(d).eval()
    with torch.device("meta"):
        ours = AutoencoderKL(preset.vae)
    ours.load_state_dict(vae_from_diffusers(ref.state_dict()), strict=True, assign=True)
    g = torch.Generator(dev).manual_seed(0)
    img = torch.rand(1, 3, 256, 256, device=dev, generator=g) * 2 - 1
    z = torch.randn(1, 4, 64, 64, device=dev, generator=g)
    with torch.no_grad():
        res = [compare(f"{label} VAE encode (mean)", ours.encode(img).mean, ref.encode(img).latent_dist.mean),
               compare(f"{label} VAE decode", ours.decode(z), ref.decode(z).sample)]
    del ref, ours
    return res


def ids_batch(dev, eos=49407, vocab=49000):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (2, 77), generator=g)
    ids[:, 0] = 49406
    ids[0, 10], ids[0, 11:] = eos, eos        # SD1-style padding with EOS
    ids[1, 20], ids[1, 21:] = eos, 0          # OpenCLIP-style padding with "!"
    return ids.to(dev)


def clip_case(label, cfg_path, text_cfg, dev="cuda"):
    from transformers import CLIPTextConfig as RefCfg, CLIPTextModel as RefCLIP, CLIPTextModelWithProjection
    d = load_json(*cfg_path)
    rcfg = RefCfg(**{k: v for k, v in d.items() if not k.startswith("_") and k != "torch_dtype"})
    klass = CLIPTextModelWithProjection if text_cfg.projection_dim else RefCLIP
    with torch.device(dev):
        ref = klass(rcfg).float().eval()   # bigG's config says float16: compare in fp32
    with torch.device("meta"):
        ours = CLIPTextModel(text_cfg)
    sd = clip_from_hf({("text_model." + k if not k.startswith(("text_model.", "text_projection")) else k): v
                       for k, v in ref.state_dict().items()})
    sd = sd[0]
    ours.load_state_dict(sd, strict=True, assign=True)
    ids = ids_batch(dev)
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        h, pooled = ours(ids)
    if text_cfg.final_norm:
        assert text_cfg.layer == -1, "final norm is applied to the last layer in every official model"
        hs = out.last_hidden_state
    else:
        hs = out.hidden_states[text_cfg.layer]
    res = [compare(f"{label} hidden states", h, hs)]
    if text_cfg.projection_dim:
        res.append(compare(f"{label} pooled projection", pooled, out.text_embeds))
    del ref, ours
    return res


def ldmbert_case(dev="cuda"):
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
    d = load_json("ldm_text2im_large_256", "bert.derived.json")
    with torch.device(dev):
        ref = LDMBertModel(LDMBertConfig(**{k: v for k, v in d.items()
                                            if k not in ("architectures", "model_type")})).eval()
    with torch.device("meta"):
        ours = LDMBert(LDM_256.text_encoders[0])
    ours.load_state_dict(ldmbert_from_diffusers(ref.state_dict()), strict=True, assign=True)
    ids = torch.randint(1000, 30000, (2, 77), generator=torch.Generator().manual_seed(0)).to(dev)
    with torch.no_grad():
        res = compare("LDM-256 LDMBert", ours(ids).hidden, ref(ids).last_hidden_state)
    del ref, ours
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--device", default="cuda")
    p.add_argument("--only", default=None, help="run only the cases whose label contains this text")
    a = p.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: this check needs a CUDA GPU (or --device cpu, slowly)")
    dev = a.device
    torch.backends.cuda.matmul.allow_tf32 = False   # fp32 means fp32: TF32 would add ~1e-3 errors
    torch.backends.cudnn.allow_tf32 = False
    cases = [
        ("SD1.5 UNet", lambda: unet_case("SD1.5", ("sd15", "unet.json"), SD15, 64, dev=dev)),
        ("SD1.5 VAE", lambda: vae_case("SD1.5", ("sd15", "vae.json"), SD15, dev=dev)),
        ("SD1.5 CLIP", lambda: clip_case("SD1.5 CLIP-L", ("sd15", "text_encoder.json"), SD15.text_encoders[0], dev=dev)),
        ("SD2 UNet", lambda: unet_case("SD2.1-768-v", ("sd21_768v", "unet.json"), SD2_V, 96, dev=dev)),
        ("SD2 CLIP", lambda: clip_case("SD2.1 OpenCLIP-H", ("sd21_768v", "text_encoder.json"),
                                       SD2_V.text_encoders[0], dev=dev)),
        ("SDXL UNet", lambda: unet_case("SDXL base", ("sdxl_base", "unet.json"), SDXL_BASE, 128, dev=dev)),
        ("SDXL VAE", lambda: vae_case("SDXL base", ("sdxl_base", "vae.json"), SDXL_BASE, dev=dev)),
        ("SDXL CLIP-L", lambda: clip_case("SDXL CLIP-L", ("sdxl_base", "text_encoder.json"),
                                          SDXL_BASE.text_encoders[0], dev=dev)),
        ("SDXL bigG", lambda: clip_case("SDXL OpenCLIP-bigG", ("sdxl_base", "text_encoder_2.json"),
                                        SDXL_BASE.text_encoders[1], dev=dev)),
        ("LDM UNet", lambda: unet_case("LDM-256", ("ldm_text2im_large_256", "unet.derived.json"), LDM_256, 32,
                                       dev=dev)),
        ("LDM VAE", lambda: vae_case("LDM-256", ("ldm_text2im_large_256", "vqvae.derived.json"), LDM_256, dev=dev)),
        ("LDM LDMBert", lambda: ldmbert_case(dev=dev)),
    ]
    rows = []
    for label, case in cases:
        if a.only and a.only not in label:
            continue
        t0 = time.time()
        res = case()
        for r in res if isinstance(res, list) else [res]:
            r["seconds"] = round(time.time() - t0, 1)
            rows.append(r)
            print(f"{r['component']}: max_abs {r['max_abs']:.3e} max_rel {r['max_rel']:.3e} "
                  f"cosine {r['cosine']:.9f} (reference std {r['ref_std']:.3g})", flush=True)
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()
    info = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
            "rows": rows}
    try:
        import diffusers
        import transformers
        info.update(diffusers=diffusers.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    if a.out:
        with open(a.out, "w") as f:
            json.dump(info, f, indent=2)
    print("\n| component | max abs diff | max abs diff / max abs ref | cosine similarity | ref std |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['component']} | {r['max_abs']:.2e} | {r['max_rel']:.2e} | {r['cosine']:.9f} | "
              f"{r['ref_std']:.3g} |")


if __name__ == "__main__":
    main()
