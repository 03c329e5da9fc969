"""Regenerate the golden fixtures of `tests/golden/` (tier 2 of the test plan) from the reference libraries.

    python tools/make_golden.py            # needs requirements-dev.txt (diffusers, transformers, peft)

Each `.safetensors` file holds one chapter's layer: tiny random reference weights (in minisd's layout, the
official checkpoint names, or in the reference layout where the converter is the point: OpenCLIP), fixed inputs,
the reference library's outputs and, where cheap, gradients of `sum(output * cotangent(output.shape))` w.r.t.
the inputs. `tests/test_golden.py` runs minisd on them with only the core dependencies. Tensor names:

    w.NAME                   a weight of the layer (its state-dict name)
    rows.NAME, rows_index.NAME   a token-embedding table stored as the rows the inputs use (the full
                             49408 x D table would be megabytes; the other rows are never read)
    in.NAME / out.NAME / grad.NAME   inputs, reference outputs, reference gradients
    CASE/...                 the same, per case, in files with several cases

and metadata, one JSON object under the key "golden": `config` (minisd config dicts, constructor arguments),
`sparse` (the full shape of each rows.* table), `made_with` (library versions), and what else a test reads.
The reference models are the oracle tests' own builders (tests/test_*.py) at smaller widths; weights go through
the same converters the oracle tests check.
The same library versions on the same machine write the same bytes.
Not from here: `kohya_sd1_locon.safetensors` and `kohya_sdxl.safetensors` are written by kohya sd-scripts' own code
(`python tools/check_kohya_fixture.py SD_SCRIPTS_CHECKOUT --write tests/golden`; sd-scripts is not a pip package).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile

import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
for p in (ROOT, TESTS):
    if p not in sys.path:
        sys.path.insert(0, p)

import diffusers  # noqa: E402
import peft  # noqa: E402
import transformers  # noqa: E402
from diffusers import DDPMScheduler, StableDiffusionPipeline  # noqa: E402
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel  # noqa: E402
from transformers import CLIPTextModel as HFCLIPTextModel  # noqa: E402
from transformers import CLIPTextModelWithProjection  # noqa: E402

import test_e2e as te2e  # noqa: E402
import test_lora as tlora  # noqa: E402
import test_samplers as tsamp  # noqa: E402
import test_text_encoders as ttext  # noqa: E402
import test_tokenizer as ttok  # noqa: E402
import test_unet as tunet  # noqa: E402
import test_vae as tvae  # noqa: E402
from conftest import BERT_VOCAB, randomize  # noqa: E402
from test_golden import (GOLDEN, PIPELINE, SAMPLER_CONFIGS, SAMPLER_STEPS, SAMPLER_VARIANTS,  # noqa: E402
                         cotangent, sampler_case)

from minisd.formats import load_model  # noqa: E402
from minisd.formats.keys_text import clip_from_hf, ldmbert_from_diffusers  # noqa: E402

VERSIONS = {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}
WRITTEN = []


def save(name: str, tensors: dict, **meta) -> None:
    """One fixture file. The metadata is one JSON string under the key "golden" (safetensors writes several keys
    in a random order, and a regeneration would then change the bytes of unchanged fixtures)."""
    path = os.path.join(GOLDEN, name + ".safetensors")
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    save_file(tensors, path, metadata={"golden": json.dumps({"made_with": VERSIONS, **meta})})
    WRITTEN.append(path)


def named(prefix: str, d: dict) -> dict:
    return {f"{prefix}{k}": v for k, v in d.items()}


def sparse_rows(sd: dict, keys, ids: torch.Tensor) -> tuple[dict, dict]:
    """The state dict with each vocabulary-sized table of `keys` replaced by its rows that `ids` use:
    (tensors, {key: full shape})."""
    index = ids.flatten().unique()                                 # sorted
    rows, shapes = {}, {}
    for key in [keys] if isinstance(keys, str) else keys:
        table = sd.pop(key)
        rows.update({f"rows.{key}": table[index], f"rows_index.{key}": index.clone()})
        shapes[key] = list(table.shape)
    return rows, shapes


def loss_of(*outputs) -> torch.Tensor:
    """The scalar every gradient in the fixtures is of: Σ output · cotangent, summed over the outputs."""
    return sum((o * cotangent(o.shape)).sum() for o in outputs)


def asdict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ tokenizer
def make_tokenizer():
    """CLIP ids under both paddings (SD1's <|endoftext|>, OpenCLIP's "!") and BERT ids, from transformers."""
    prompts = ttok.PROMPTS
    save("tokenizer", {"out.clip_eos_pad": ttok.ids(ttok.hf_clip("<|endoftext|>"), prompts),
                       "out.clip_bang_pad": ttok.ids(ttok.hf_clip("!"), prompts),
                       "out.bert": ttok.ids(ttok.HFBert.from_pretrained(BERT_VOCAB), prompts)},
         prompts=prompts)


# ------------------------------------------------------------------------------------------------ text encoders
def token_grad_rows(ref, ids: torch.Tensor) -> torch.Tensor:
    """Gradient of the reference's token embedding at the used rows (HF CLIP names, ours too)."""
    grads, _ = clip_from_hf(ttext.grads_of(ref))
    return grads["text_model.embeddings.token_embedding.weight"][ids.flatten().unique()]


def make_clip():
    """SD1 CLIP-L style (quick_gelu), read two ways from the same weights: last layer + final norm (SD1) and
    the penultimate layer without it (SDXL encoder 1); pooled at the first EOS."""
    ref = randomize(HFCLIPTextModel(ttext.hf_clip_cfg("quick_gelu", 49407)), seed=1).eval()
    sd, _ = clip_from_hf(ref.state_dict())
    ids = ttok.ids(ttok.hf_clip("<|endoftext|>"), ttext.PROMPTS)
    out = ref(ids, output_hidden_states=True)
    hidden, penultimate, pooled = out.last_hidden_state, out.hidden_states[-2], out.pooler_output
    loss_of(hidden, penultimate, pooled).backward()
    rows, sparse = sparse_rows(sd, "text_model.embeddings.token_embedding.weight", ids)
    save("clip", {**named("w.", sd), **rows, "in.ids": ids, "out.hidden": hidden, "out.penultimate": penultimate,
                  "out.pooled": pooled, "grad.token_rows": token_grad_rows(ref, ids)},
         sparse=sparse, prompts=ttext.PROMPTS,
         config={"last": asdict(ttext.our_clip_cfg("quick_gelu", -1, True)),
                 "penultimate": asdict(ttext.our_clip_cfg("quick_gelu", -2, False))})


def make_clip_openclip():
    """SDXL encoder 2 style (OpenCLIP bigG: gelu, penultimate layer, pooled x text_projection), the weights
    in OpenCLIP's layout (fused q/k/v, the projection stored [in, out], logit_scale): clip_from_openclip's job.
    The projection is square, so only the numbers show a missing transpose."""
    D = ttext.D
    ref = randomize(CLIPTextModelWithProjection(ttext.hf_clip_cfg("gelu", 49407, projection=D)), seed=6).eval()
    oc = ttext.openclip_from_reference(ref.state_dict(), ttext.LAYERS, D, projection=D)
    surplus = f"transformer.resblocks.{ttext.LAYERS}."             # SD2's extra block: not in bigG files
    oc = {k: v for k, v in oc.items() if not k.startswith(surplus)}
    ids = ttok.ids(ttok.hf_clip("!"), ttext.PROMPTS)
    out = ref(ids, output_hidden_states=True)
    hidden, pooled = out.hidden_states[-2], out.text_embeds
    loss_of(hidden, pooled).backward()
    rows, sparse = sparse_rows(oc, "token_embedding.weight", ids)
    save("clip_openclip", {**named("w.", oc), **rows, "in.ids": ids, "out.hidden": hidden, "out.pooled": pooled,
                           "grad.token_rows": token_grad_rows(ref, ids)},
         sparse=sparse, prompts=ttext.PROMPTS,
         config=asdict(ttext.our_clip_cfg("gelu", -2, False, projection=D, pad="!")))


def make_ldmbert():
    """LDMBert (diffusers' LDMBertModel), converted to the CompVis names; head_dim x heads != d_model."""
    ref = randomize(LDMBertModel(ttext.tiny_ldmbert_hf_cfg()), seed=8).eval()
    sd = ldmbert_from_diffusers(ref.state_dict())
    ids = ttok.ids(ttok.HFBert.from_pretrained(BERT_VOCAB), ttext.PROMPTS)
    hidden = ref(ids).last_hidden_state
    loss_of(hidden).backward()
    grads = ttext._map_ldmbert_grads(ref, ttext.grads_of(ref))
    key = "transformer.token_emb.weight"
    # to_logits (the unused language-model head, vocabulary x d_model) is kept only at the same rows
    rows, sparse = sparse_rows(sd, [key, "transformer.to_logits.weight", "transformer.to_logits.bias"], ids)
    c = ttext.tiny_ldmbert_hf_cfg()
    cfg = dict(vocab_size=c.vocab_size, n_layer=c.encoder_layers, d_model=c.d_model, n_heads=c.encoder_attention_heads,
               head_dim=c.head_dim, ffn_dim=c.encoder_ffn_dim)
    save("ldmbert", {**named("w.", sd), **rows, "in.ids": ids, "out.hidden": hidden,
                     "grad.token_rows": grads[key][ids.flatten().unique()]},
         sparse=sparse, prompts=ttext.PROMPTS, config=cfg)


# ------------------------------------------------------------------------------------------------ VAE
def make_vae():
    """AutoencoderKL, two levels of 8 and 16 channels (4 GroupNorm groups at 16), non-square 16x24 images."""
    ref, ours = tvae.tiny_pair(1, seed=1, channels=(8, 16))
    x = (torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(2)) * 2 - 1).requires_grad_()
    post = ref.encode(x).latent_dist
    loss_of(post.mean, post.logvar).backward()
    z = randn(2, 4, 8, 12, seed=3).requires_grad_()
    image = ref.decode(z).sample
    loss_of(image).backward()
    save("vae", {**named("w.", ours.state_dict()), "in.x": x, "out.mean": post.mean, "out.logvar": post.logvar,
                 "out.sample_seed7": post.sample(generator=torch.Generator().manual_seed(7)), "grad.x": x.grad,
                 "in.z": z, "out.image": image, "grad.z": z.grad},
         config=asdict(ours.cfg))


# ------------------------------------------------------------------------------------------------ UNet, attention
# The oracle test's SD1 and SDXL cases at 8 / 16 channels with 4 GroupNorm groups (a fixture of tens of kB).
# SDXL with one ResBlock per level (its depth-2 transformers are most of the weights).
SMALL = {"block_out_channels": [8, 16], "norm_num_groups": 4}
UNET_CASES = {"sd1": ("golden_sd1", SMALL), "sdxl": ("golden_sdxl", {**SMALL, "layers_per_block": 1})}
# (UNet case, our module, diffusers module): the first SpatialTransformer of each (1x1 conv vs Linear
# projections; depth 1 vs 2).
ATTENTION = {"conv": ("sd1", "input_blocks.1.1", "down_blocks.0.attentions.0"),
             "linear": ("sdxl", "input_blocks.3.1", "down_blocks.1.attentions.0")}


def unet_pair(case: str):
    """test_unet.make_pair on the case at the SMALL widths."""
    name, small = UNET_CASES[case]
    tunet.CASES[name] = {**tunet.CASES[case], **small}
    return tunet.make_pair(name, seed=5)


def make_unet(case: str):
    """Output and gradients w.r.t. the latents and the text states (and SDXL's pooled text) on a non-square
    6x10 latent, float timesteps 999 and 17.5."""
    theirs, ours, cfg = unet_pair(case)
    x = randn(2, 4, 6, 10, seed=1).requires_grad_()
    ctx = randn(2, 7, cfg.context_dim, seed=2).requires_grad_()
    t = torch.tensor([999.0, 17.5])
    tensors = {"in.x": x, "in.context": ctx, "in.t": t}
    kwargs = {}
    if case == "sdxl":
        pooled = randn(2, tunet.POOLED, seed=3).requires_grad_()
        time_ids = torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 1024.0], [512.0, 512.0, 8.0, 0.0, 832.0, 1216.0]])
        kwargs = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        tensors.update({"in.pooled": pooled, "in.time_ids": time_ids})
    out = theirs(x, t, encoder_hidden_states=ctx, **kwargs).sample
    loss_of(out).backward()
    tensors.update({"out.eps": out, "grad.x": x.grad, "grad.context": ctx.grad})
    if case == "sdxl":
        tensors["grad.pooled"] = pooled.grad
    save(f"unet_{case}", {**named("w.", ours.state_dict()), **tensors}, config=asdict(cfg),
         addition_time_embed_dim=tunet.TIME_EMBED)


def make_attention():
    """SpatialTransformer alone (diffusers' Transformer2DModel): 1x1-conv projections / depth 1 (SD1) and
    Linear projections / depth 2 (SDXL), on a non-square 5x7 feature map with 6 context tokens, and on the same
    map scaled by 1e-3."""
    tensors, config = {}, {}
    for name, (case, ours_name, theirs_name) in ATTENTION.items():
        theirs, ours, cfg = unet_pair(case)
        ref, mine = theirs.get_submodule(theirs_name), ours.get_submodule(ours_name)
        C = mine.norm.num_channels
        x = randn(2, C, 5, 7, seed=11).requires_grad_()
        ctx = randn(2, 6, cfg.context_dim, seed=12).requires_grad_()
        out = ref(x, encoder_hidden_states=ctx).sample
        loss_of(out).backward()
        # The same map at 1/1000 the amplitude: its variance (1e-6) is comparable with the GroupNorm's eps, which
        # the output then pins (at unit variance a wrong eps of 1e-5 moves it by 1e-6 only, below fp32 noise).
        x_small = x.detach() * 1e-3
        with torch.no_grad():
            out_small = ref(x_small, encoder_hidden_states=ctx).sample
        block = mine.transformer_blocks[0]
        config[name] = dict(in_channels=C, n_heads=block.attn1.heads, d_head=block.attn1.to_q.out_features //
                            block.attn1.heads, depth=len(mine.transformer_blocks), context_dim=cfg.context_dim,
                            use_linear=mine.use_linear, norm_num_groups=mine.norm.num_groups)
        tensors.update(named(f"{name}/", {**named("w.", mine.state_dict()), "in.x": x, "in.context": ctx,
                                           "out.x": out, "grad.x": x.grad, "grad.context": ctx.grad,
                                           "in.x_small": x_small, "out.x_small": out_small}))
    save("attention", tensors, config=config)


# ------------------------------------------------------------------------------------------------ schedule
def make_schedule():
    """betas and ᾱ of DDPMScheduler for the SD schedule (every official config: SD1, SD2, SDXL, LDM) and the
    DDPM linear one, plain and rescaled to zero terminal SNR; add_noise / get_velocity at a few t."""
    schedules = {"scaled_linear": tsamp.CONFIGS["sd15"], "linear": tsamp.CONFIGS["trailing_sample"]}
    tensors, config = {}, {}
    for name, d in schedules.items():
        cfg = tsamp.our_config(d)
        config[name] = asdict(cfg)
        for zsnr in (False, True):
            ref = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start,
                                beta_end=cfg.beta_end, beta_schedule=cfg.beta_schedule, rescale_betas_zero_snr=zsnr)
            tag = f"{name}{'_zsnr' if zsnr else ''}/"
            tensors.update({tag + "out.betas": ref.betas, tag + "out.alphas_cumprod": ref.alphas_cumprod})
    ref = DDPMScheduler(**{k: config["scaled_linear"][k] for k in ("beta_start", "beta_end", "beta_schedule")})
    x0, noise = randn(5, 4, 3, 5, seed=0), randn(5, 4, 3, 5, seed=1)
    t = torch.tensor([0, 1, 500, 998, 999])
    tensors.update({"noising/in.x0": x0, "noising/in.noise": noise, "noising/in.t": t,
                    "noising/out.q_sample": ref.add_noise(x0, noise, t),
                    "noising/out.velocity": ref.get_velocity(x0, noise, t)})
    save("schedule", tensors, config=config,
         official={"scaled_linear": ["sd15", "sd2_base", "sd2_v", "sdxl_base", "ldm_256"]})


# ------------------------------------------------------------------------------------------------ samplers
def make_samplers():
    """Each sampler (and Karras grid, DDIM η) under the SD1, SD2-v and SDXL scheduler configs: the reference
    loop driven by the oracle test's toy model. Per step: the state x_i, the scaled model input, the model
    output and x_{i+1}; the stochastic steps draw from a CPU generator seeded 42."""
    tensors, config = {}, {}
    for cname in SAMPLER_CONFIGS:
        d = tsamp.CONFIGS[cname]
        config[cname] = asdict(tsamp.our_config(d))
        for kind, karras, eta in SAMPLER_VARIANTS:
            ref = tsamp.reference(kind, d, karras)
            ref.set_timesteps(SAMPLER_STEPS)
            g = torch.Generator().manual_seed(42)
            x = randn(1, 4, 3, 5, seed=0) * ref.init_noise_sigma
            xs, scaled, eps = [x], [], []
            kwargs = {"eta": eta} if kind == "ddim" else {}
            for t in ref.timesteps:
                a = ref.scale_model_input(x, t)
                e = tsamp.toy_model(a, t)
                x = ref.step(e, t, x, generator=g, **kwargs).prev_sample
                xs.append(x)
                scaled.append(a)
                eps.append(e)
            case = sampler_case(cname, kind, karras, eta) + "/"
            tensors.update({case + "out.timesteps": ref.timesteps, case + "out.x": torch.stack(xs),
                            case + "out.scaled": torch.stack(scaled), case + "in.eps": torch.stack(eps),
                            case + "out.init_noise_sigma": torch.tensor(float(ref.init_noise_sigma))})
            if hasattr(ref, "sigmas"):
                tensors[case + "out.sigmas"] = ref.sigmas
    save("samplers", tensors, config=config, variants=SAMPLER_VARIANTS, steps=SAMPLER_STEPS)


# ------------------------------------------------------------------------------------------------ pipeline
def make_pipeline():
    """A tiny random SD1 diffusers pipeline (DDIM from SD1.5's scheduler config, guidance with a negative prompt),
    read into minisd by minisd.formats.load_model; the reference latents and image for PIPELINE's settings."""
    p = PIPELINE
    vae, _ = tvae.tiny_pair(1, seed=4, channels=(8, 16))
    unet = te2e.tiny_unet(3, block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=2,
                          cross_attention_dim=16)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te2e.tiny_clip(2, hidden=16), tokenizer=te2e.clip_tokenizer(),
                                   unet=unet, scheduler=te2e.make_scheduler(
                                       "ddim", te2e.scheduler_config("sd15/scheduler_config.json")),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    run = dict(prompt=p["prompt"], negative_prompt=p["negative"], num_inference_steps=p["steps"],
               guidance_scale=p["cfg_scale"], height=p["height"], width=p["width"])
    latents = pipe(**run, generator=torch.Generator().manual_seed(p["seed"]), output_type="latent").images
    image = pipe(**run, generator=torch.Generator().manual_seed(p["seed"]), output_type="np").images
    image = torch.from_numpy(image)                                # (1, H, W, 3) in [0, 1]
    noise = randn(1, 4, p["height"] // 2, p["width"] // 2, seed=p["seed"])   # the pipelines' x_T (before σ_init)
    with tempfile.TemporaryDirectory() as tmp:
        pipe.save_pretrained(tmp)
        model = load_model(tmp)
    ids = pipe.tokenizer([p["prompt"], p["negative"]], padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids
    sd = model.state_dict()
    rows, sparse = sparse_rows(sd, "text_encoders.0.text_model.embeddings.token_embedding.weight", ids)
    save("pipeline", {**named("w.", sd), **rows, "in.noise": noise, "out.latents": latents, "out.image": image},
         sparse=sparse, config=model.cfg.to_dict(), run=p)


# ------------------------------------------------------------------------------------------------ LoRA
def make_lora():
    """PEFT LoRA (rank 4, alpha 3: scale 0.75, B non-zero) on a Linear 8->12 and a 3x3 stride-2 Conv2d 4->8 vs
    minisd's LoRALinear / LoRAConv2d: outputs, and gradients w.r.t. the input and both adapter matrices."""
    rank, alpha = 4, 3.0
    pm, ours = tlora.peft_pair(rank, alpha)
    inputs = {"to_q": randn(2, 5, 8, seed=1), "conv_in": randn(2, 4, 6, 10, seed=2)}
    tensors, config = {}, {}
    for name, x in inputs.items():
        layer = pm.base_model.model.get_submodule(name)
        x = x.clone().requires_grad_()
        y = layer(x)
        loss_of(y).backward()
        base = layer.base_layer
        config[name] = ({"kind": "linear", "in": base.in_features, "out": base.out_features} if name == "to_q" else
                        {"kind": "conv", "in": base.in_channels, "out": base.out_channels,
                         "kernel": base.kernel_size[0], "stride": base.stride[0], "padding": base.padding[0]})
        config[name].update(rank=rank, alpha=alpha)
        sd = ours.get_submodule(name).state_dict()
        tensors.update(named(f"{name}/", {**named("w.", sd), "in.x": x, "out.y": y, "grad.x": x.grad,
                                          "grad.lora_down": layer.lora_A["default"].weight.grad,
                                          "grad.lora_up": layer.lora_B["default"].weight.grad}))
    save("lora", tensors, config=config)


def main() -> int:
    os.makedirs(GOLDEN, exist_ok=True)
    torch.manual_seed(0)
    for make in (make_tokenizer, make_clip, make_clip_openclip, make_ldmbert, make_vae, make_attention,
                 lambda: make_unet("sd1"), lambda: make_unet("sdxl"), make_schedule, make_samplers, make_pipeline,
                 make_lora):
        make()
    total = 0
    for path in WRITTEN:
        size = os.path.getsize(path)
        total += size
        print(f"{os.path.relpath(path, ROOT):40s} {size / 1024:8.1f} kB")
    print(f"{'total':40s} {total / 1024:8.1f} kB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
