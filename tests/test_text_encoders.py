"""Text encoders vs transformers / diffusers (tier 1), and the key tables on the official layouts.

  (a) CLIP-L (SD1; SDXL encoder 1)   vs transformers CLIPTextModel                outputs + grads
  (b) OpenCLIP bigG (SDXL encoder 2) vs CLIPTextModelWithProjection hidden_states[-2], text_embeds
  (c) OpenCLIP ViT-H (SD2): an OpenCLIP-layout state dict built by hand from the reference weights
      (fused q,k,v, transposed projection, a surplus block, logit_scale) -> clip_from_openclip
  (d) LDMBert vs diffusers LDMBertModel through ldmbert_from_diffusers          outputs + grads
  (e) every tensor of the full-size manifests consumed or ignored, result == our modules (meta)
  (f) one return type for every encoder; `StableDiffusion.encode_text` (what the pipeline, the trainer and the
      text cache call) puts SDXL's two encoders side by side and keeps the second one's pooled vector

Token ids are real tokenized prompts (both paddings), so the pooled EOS position is exercised
exactly as in the pipelines.
"""
import json
import os

import pytest
import torch

from conftest import REFERENCE, randomize, save_tiny_sdxl

from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig as HFLDMBertConfig
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel
from transformers import CLIPTextConfig as HFCLIPConfig
from transformers import CLIPTextModel as HFCLIPTextModel
from transformers import CLIPTextModelWithProjection

from minisd.clip import CLIPTextModel, TextEncoderOutput
from minisd.config import LDM_256, SD2_V, SD15, SDXL_BASE, CLIPTextConfig, LDMBertConfig
from minisd.formats.keys_text import (clip_from_hf, clip_from_openclip, clip_to_openclip, ldmbert_from_diffusers,
                              ldmbert_to_diffusers)
from minisd.ldmbert import LDMBert
from minisd.model import load_minisd_folder
from minisd.pipeline import Pipeline
from minisd.tokenizer import BertTokenizer, CLIPTokenizer

# Measured max-abs difference vs transformers / diffusers: hidden states 1.7e-6 (LDMBert; CLIP 1.2-1.7e-6), gradients
# 1.1e-6 of the largest (2-core x86 VM); bound 5e-6, a margin of ~3x.
TOL = 5e-6
PROMPTS = ["a photo of an astronaut riding a horse", "", "A RED CUBE on a blue sphere, 8k!!",
           "a very long prompt " * 30]
D, FF, HEADS, LAYERS = 48, 96, 4, 3


def maxdiff(a, b):
    return (a.detach().float() - b.detach().float()).abs().max().item()


def assert_close(ours, ref, what, tol=TOL):
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    d = maxdiff(ours, ref)
    assert d < tol, f"{what}: max abs difference {d:.3e}"


def weights(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def grads_of(module):
    return {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


def compare_grads(ours: dict, ref: dict, what: str):
    """Every parameter gradient, relative to the largest reference gradient (embeddings of repeated
    tokens collect large sums)."""
    assert set(ours) == set(ref), f"{what}: gradient sets differ: {sorted(set(ours) ^ set(ref))[:5]}"
    scale = max(g.abs().max().item() for g in ref.values())
    for name in ref:
        d = maxdiff(ours[name], ref[name])
        assert d / max(scale, 1.0) < TOL, f"{what}: grad of {name}: max abs difference {d:.3e} (scale {scale:.2e})"


def hf_clip_cfg(act, eos_token_id, projection=None):
    kw = dict(vocab_size=49408, hidden_size=D, intermediate_size=FF, num_attention_heads=HEADS,
              num_hidden_layers=LAYERS, hidden_act=act, max_position_embeddings=77, layer_norm_eps=1e-5,
              eos_token_id=eos_token_id, bos_token_id=0 if eos_token_id == 2 else 49406,
              pad_token_id=1, attn_implementation="eager")
    if projection:
        kw["projection_dim"] = projection
    return HFCLIPConfig(**kw)


def our_clip_cfg(act, layer, final_norm, projection=None, pad="<|endoftext|>", layers=LAYERS):
    return CLIPTextConfig(hidden_size=D, intermediate_size=FF, num_attention_heads=HEADS, num_hidden_layers=layers,
                          hidden_act=act, layer=layer, final_norm=final_norm, projection_dim=projection,
                          pad_token=pad)


def load_ours(cfg, sd):
    ours = CLIPTextModel(cfg)
    ours.load_state_dict(sd, strict=True)
    return ours


# ---------------------------------------------------------------------------------------------
# (a) CLIP-L style, (b) SDXL encoder-2 style
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eos_token_id", [2, 49407])      # legacy hub configs say 2: argmax rule
@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
@pytest.mark.parametrize("layer,final_norm", [(-1, True), (-2, False)])   # SD1; SDXL encoder 1
def test_clip_l_matches_transformers(eos_token_id, pad, layer, final_norm):
    ref = randomize(HFCLIPTextModel(hf_clip_cfg("quick_gelu", eos_token_id)), seed=1).eval()
    sd, ignored = clip_from_hf(ref.state_dict())
    assert not ignored                                  # transformers >= 4.31 keeps no position_ids
    ours = load_ours(our_clip_cfg("quick_gelu", layer, final_norm, pad=pad), sd)
    ids = CLIPTokenizer(pad_token=pad)(PROMPTS)

    out = ref(ids, output_hidden_states=True)
    h_ref = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
    h, pooled = ours(ids)
    assert_close(h, h_ref, "hidden")
    assert_close(pooled, out.pooler_output, "pooled")

    w1, w2 = weights(h.shape, 11), weights(pooled.shape, 12)
    ((h_ref * w1).sum() + (out.pooler_output * w2).sum()).backward()
    ((h * w1).sum() + (pooled * w2).sum()).backward()
    compare_grads(grads_of(ours), clip_from_hf(grads_of(ref))[0], "CLIP-L")


def test_sdxl_encoder2_matches_transformers_with_projection():
    ref = randomize(CLIPTextModelWithProjection(hf_clip_cfg("gelu", 49407, projection=40)), seed=2).eval()
    sd, _ = clip_from_hf(ref.state_dict())
    ours = load_ours(our_clip_cfg("gelu", -2, False, projection=40, pad="!"), sd)
    assert "text_projection.bias" not in dict(ours.named_parameters())
    ids = CLIPTokenizer(pad_token="!")(PROMPTS)

    out = ref(ids, output_hidden_states=True)
    h, pooled = ours(ids)
    assert_close(h, out.hidden_states[-2], "hidden_states[-2]")
    assert_close(pooled, out.text_embeds, "text_embeds")
    assert pooled.shape == (len(PROMPTS), 40)

    w1, w2 = weights(h.shape, 21), weights(pooled.shape, 22)
    ((out.hidden_states[-2] * w1).sum() + (out.text_embeds * w2).sum()).backward()
    ((h * w1).sum() + (pooled * w2).sum()).backward()
    compare_grads(grads_of(ours), clip_from_hf(grads_of(ref))[0], "SDXL encoder 2")


def test_clip_state_dict_names_and_meta_loading():
    cfg = our_clip_cfg("gelu", -2, False, projection=40)
    ref = CLIPTextModelWithProjection(hf_clip_cfg("gelu", 49407, projection=40))
    ours = CLIPTextModel(cfg)
    assert set(ours.state_dict()) == set(ref.state_dict())        # HF names, no position_ids buffer
    assert not list(ours.buffers())
    with torch.device("meta"):                                      # how model.py builds it
        meta = CLIPTextModel(cfg)
    meta.load_state_dict(randomize(ours, 3).state_dict(), strict=True, assign=True)
    ids = CLIPTokenizer()(PROMPTS[:2])
    assert torch.equal(meta(ids)[0], ours(ids)[0])


# ---------------------------------------------------------------------------------------------
# (c) SD2 / bigG through the OpenCLIP layout
# ---------------------------------------------------------------------------------------------
def openclip_from_reference(ref_sd: dict, n_layers: int, width: int, projection=None, seed=5) -> dict:
    """Write the reference HF weights in OpenCLIP's layout by hand (the layout of
    `cond_stage_model.model.*`), plus what real files carry and we must ignore."""
    g = torch.Generator().manual_seed(seed)
    hf = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in ref_sd.items()}
    oc = {"token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"].clone(),
          "positional_embedding": hf["text_model.embeddings.position_embedding.weight"].clone(),
          "ln_final.weight": hf["text_model.final_layer_norm.weight"].clone(),
          "ln_final.bias": hf["text_model.final_layer_norm.bias"].clone(),
          "logit_scale": torch.tensor(4.6052)}
    for i in range(n_layers + 1):
        t = f"transformer.resblocks.{i}."
        if i == n_layers:   # SD2 files hold one block more than the penultimate-layer model uses
            for name, shape in (("attn.in_proj_weight", (3 * width, width)), ("attn.in_proj_bias", (3 * width,)),
                                ("attn.out_proj.weight", (width, width)), ("attn.out_proj.bias", (width,)),
                                ("ln_1.weight", (width,)), ("ln_1.bias", (width,)), ("ln_2.weight", (width,)),
                                ("ln_2.bias", (width,)), ("mlp.c_fc.weight", (FF, width)), ("mlp.c_fc.bias", (FF,)),
                                ("mlp.c_proj.weight", (width, FF)), ("mlp.c_proj.bias", (width,))):
                oc[t + name] = torch.randn(shape, generator=g)
            continue
        h = f"text_model.encoder.layers.{i}."
        for p in ("weight", "bias"):
            oc[f"{t}attn.in_proj_{p}"] = torch.cat([hf[f"{h}self_attn.{x}_proj.{p}"] for x in "qkv"])
            oc[f"{t}attn.out_proj.{p}"] = hf[f"{h}self_attn.out_proj.{p}"].clone()
            oc[f"{t}ln_1.{p}"] = hf[f"{h}layer_norm1.{p}"].clone()
            oc[f"{t}ln_2.{p}"] = hf[f"{h}layer_norm2.{p}"].clone()
            oc[f"{t}mlp.c_fc.{p}"] = hf[f"{h}mlp.fc1.{p}"].clone()
            oc[f"{t}mlp.c_proj.{p}"] = hf[f"{h}mlp.fc2.{p}"].clone()
    # OpenCLIP: pooled @ text_projection with the matrix stored [in, out].
    oc["text_projection"] = (hf["text_projection.weight"].T.clone() if projection
                             else torch.randn(width, width, generator=g))
    return oc


def test_sd2_openclip_layout_matches_reference():
    ref = randomize(HFCLIPTextModel(hf_clip_cfg("gelu", 49407)), seed=4).eval()
    oc = openclip_from_reference(ref.state_dict(), LAYERS, D)
    cfg = our_clip_cfg("gelu", -1, True, pad="!")       # SD2: last of the kept blocks + final LN
    sd, ignored = clip_from_openclip(oc, cfg)
    surplus = {k for k in oc if k.startswith(f"transformer.resblocks.{LAYERS}.")}
    assert set(ignored) == {"logit_scale", "text_projection"} | surplus
    ours = load_ours(cfg, sd)
    ids = CLIPTokenizer(pad_token="!")(PROMPTS)
    with torch.no_grad():
        out = ref(ids)
        h, pooled = ours(ids)
    assert_close(h, out.last_hidden_state, "hidden (SD2 via OpenCLIP)")
    assert_close(pooled, out.pooler_output, "pooled (SD2 via OpenCLIP)")

    back = clip_to_openclip(ours.state_dict(), cfg)
    kept = {k: v for k, v in oc.items() if k not in ignored}
    assert set(back) == set(kept)
    for k in kept:
        assert torch.equal(back[k], kept[k]), k


def test_bigg_openclip_layout_projection_transposed():
    ref = randomize(CLIPTextModelWithProjection(hf_clip_cfg("gelu", 49407, projection=D)), seed=6).eval()
    oc = openclip_from_reference(ref.state_dict(), LAYERS, D, projection=D)
    cfg = our_clip_cfg("gelu", -2, False, projection=D, pad="!")
    sd, ignored = clip_from_openclip(oc, cfg)
    assert "text_projection" not in ignored and "logit_scale" in ignored
    ours = load_ours(cfg, sd)
    ids = CLIPTokenizer(pad_token="!")(PROMPTS)
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        h, pooled = ours(ids)
    assert_close(h, out.hidden_states[-2], "hidden_states[-2] (bigG via OpenCLIP)")
    # The projection is square here: only the numbers show a missing transpose.
    assert_close(pooled, out.text_embeds, "text_embeds (bigG via OpenCLIP)")
    back = clip_to_openclip(ours.state_dict(), cfg)
    assert all(torch.equal(back[k], oc[k]) for k in back) and set(back) == set(oc) - set(ignored)


def test_key_tables_reject_unknown_and_missing():
    cfg = our_clip_cfg("gelu", -1, True)
    ref = randomize(HFCLIPTextModel(hf_clip_cfg("gelu", 49407)), seed=7)
    oc = openclip_from_reference(ref.state_dict(), LAYERS, D)
    with pytest.raises(KeyError, match="unexpected.*surprise"):
        clip_from_openclip({**oc, "surprise.weight": torch.zeros(1)}, cfg)
    with pytest.raises(KeyError, match="missing.*ln_final.bias"):
        clip_from_openclip({k: v for k, v in oc.items() if k != "ln_final.bias"}, cfg)
    with pytest.raises(KeyError, match="missing.*in_proj_weight"):
        clip_from_openclip({k: v for k, v in oc.items() if k != "transformer.resblocks.1.attn.in_proj_weight"}, cfg)
    with pytest.raises(KeyError, match="unexpected.*vision_model"):
        clip_from_hf({**ref.state_dict(), "vision_model.post_layernorm.weight": torch.zeros(1)})
    _, ignored = clip_from_hf({**ref.state_dict(), "text_model.embeddings.position_ids": torch.arange(77)[None]})
    assert list(ignored) == ["text_model.embeddings.position_ids"]
    with pytest.raises(KeyError, match="unexpected.*model.extra"):
        ldmbert_from_diffusers({**LDMBertModel(tiny_ldmbert_hf_cfg()).state_dict(), "model.extra": torch.zeros(1)})


# ---------------------------------------------------------------------------------------------
# (d) LDMBert
# ---------------------------------------------------------------------------------------------
def tiny_ldmbert_hf_cfg():
    # head_dim * heads (32) != d_model (48), as in the real model (512 vs 1280).
    return HFLDMBertConfig(vocab_size=30522, max_position_embeddings=77, encoder_layers=3, encoder_ffn_dim=FF,
                           encoder_attention_heads=4, head_dim=8, d_model=D, pad_token_id=0)


def test_ldmbert_matches_diffusers():
    ref = randomize(LDMBertModel(tiny_ldmbert_hf_cfg()), seed=8).eval()     # eval: dropout 0.1 off
    cfg = LDMBertConfig(vocab_size=30522, n_layer=3, d_model=D, n_heads=4, head_dim=8, ffn_dim=FF)
    ours = LDMBert(cfg)
    ours.load_state_dict(ldmbert_from_diffusers(ref.state_dict()), strict=True)
    ids = BertTokenizer()(PROMPTS)

    h_ref = ref(ids).last_hidden_state
    h = ours(ids).hidden
    assert_close(h, h_ref, "LDMBert hidden")
    w = weights(h.shape, 31)
    (h_ref * w).sum().backward()
    (h * w).sum().backward()
    ref_grads = grads_of(ref)
    assert "to_logits.weight" not in ref_grads                  # unused head: no gradient either side
    compare_grads(grads_of(ours), _map_ldmbert_grads(ref, ref_grads), "LDMBert")

    back = ldmbert_to_diffusers(ours.state_dict())
    assert set(back) == set(ref.state_dict())
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())


def _map_ldmbert_grads(ref, ref_grads):
    """diffusers gradient names -> ours through the same table (the table wants every name: an empty
    tensor stands in where the reference has no gradient, and is dropped again)."""
    mapped = ldmbert_from_diffusers({k: ref_grads.get(k, torch.zeros(0)) for k in ref.state_dict()})
    return {k: v for k, v in mapped.items() if v.numel()}


# ---------------------------------------------------------------------------------------------
# (e) full-size manifests
# ---------------------------------------------------------------------------------------------
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32}


def manifest(name: str, prefix: str) -> dict:
    with open(os.path.join(REFERENCE, name)) as f:
        tensors = json.load(f)["tensors"]
    out = {k[len(prefix):]: torch.empty(v["shape"], dtype=DTYPES[v["dtype"]], device="meta")
           for k, v in tensors.items() if k.startswith(prefix)}
    assert out, f"no {prefix} tensors in {name}"
    return out


def assert_fills(module, sd: dict, what: str):
    own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    assert set(own) == set(got), \
        f"{what}: missing {sorted(set(own) - set(got))[:5]}, extra {sorted(set(got) - set(own))[:5]}"
    wrong = [k for k in own if own[k] != got[k]]
    assert not wrong, f"{what}: shape mismatch {[(k, own[k], got[k]) for k in wrong[:5]]}"


def meta(cls, cfg):
    with torch.device("meta"):
        return cls(cfg)


def test_manifest_sd2_openclip_h():
    cfg = SD2_V.text_encoders[0]
    raw = manifest("sd21_768v_single_file.json", "cond_stage_model.model.")
    sd, ignored = clip_from_openclip(raw, cfg)
    block23 = {k for k in raw if k.startswith("transformer.resblocks.23.")}
    assert set(ignored) == {"logit_scale", "text_projection"} | block23
    assert len(ignored) == 14
    assert_fills(meta(CLIPTextModel, cfg), sd, "SD2 text encoder")
    assert set(clip_to_openclip(sd, cfg)) == set(raw) - set(ignored)
    # The diffusers folder of the same model: HF names, 23 layers.
    sd, ignored = clip_from_hf(manifest("sd21_768v_diffusers.json", "text_encoder/"))
    assert list(ignored) == ["text_model.embeddings.position_ids"]
    assert_fills(meta(CLIPTextModel, cfg), sd, "SD2 diffusers text encoder")


def test_manifest_sdxl_both_encoders():
    enc1, enc2 = SDXL_BASE.text_encoders
    sd, ignored = clip_from_hf(manifest("sdxl_base_single_file.json", "conditioner.embedders.0.transformer."))
    assert list(ignored) == ["text_model.embeddings.position_ids"]
    assert_fills(meta(CLIPTextModel, enc1), sd, "SDXL encoder 1")
    raw = manifest("sdxl_base_single_file.json", "conditioner.embedders.1.model.")
    sd, ignored = clip_from_openclip(raw, enc2)
    assert list(ignored) == ["logit_scale"]
    assert_fills(meta(CLIPTextModel, enc2), sd, "SDXL encoder 2")
    assert sd["text_projection.weight"].shape == (1280, 1280)
    assert set(clip_to_openclip(sd, enc2)) == set(raw) - {"logit_scale"}
    for sub, cfg in (("text_encoder/", enc1), ("text_encoder_2/", enc2)):
        sd, ignored = clip_from_hf(manifest("sdxl_base_diffusers.json", sub))
        assert not ignored
        assert_fills(meta(CLIPTextModel, cfg), sd, f"SDXL diffusers {sub}")


def test_manifest_sd15_clip_l():
    sd, ignored = clip_from_hf(manifest("sd15_single_file.json", "cond_stage_model.transformer."))
    assert list(ignored) == ["text_model.embeddings.position_ids"]
    assert_fills(meta(CLIPTextModel, SD15.text_encoders[0]), sd, "SD1.5 text encoder")


def test_manifest_ldmbert_original_and_diffusers():
    cfg = LDM_256.text_encoders[0]
    model = meta(LDMBert, cfg)
    original = manifest("ldm_txt2img_f8_large_original.json", "cond_stage_model.")
    assert_fills(model, original, "LDMBert (CompVis names, no table)")
    bert = manifest("ldm_text2im_large_256_diffusers.json", "bert/")
    sd = ldmbert_from_diffusers(bert)
    assert_fills(model, sd, "LDMBert (diffusers bert/)")
    back = ldmbert_to_diffusers(original)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in bert.items()}


# ---------------------------------------------------------------------------------------------------------------------
# (f) one return type, one "encode the prompt"
def test_encoders_share_one_output_and_encode_text_joins_them(tmp_path):
    ids = BertTokenizer()(PROMPTS[:2])
    bert = LDMBert(LDMBertConfig(vocab_size=30522, n_layer=1, d_model=D, n_heads=4, head_dim=8, ffn_dim=FF)).eval()
    out = bert(ids)
    assert isinstance(out, TextEncoderOutput) and out.pooled is None and out.hidden.shape == (2, 77, D)

    model = load_minisd_folder(save_tiny_sdxl(tmp_path / "xl")).eval()
    prompts = ["a red circle", "a blue square on the left"]
    toks = model.tokenize(prompts)
    assert [tuple(x.shape) for x in toks] == [(2, 77), (2, 77)] and not torch.equal(toks[0], toks[1])  # own pads
    with torch.no_grad():
        first, second = (te(x) for te, x in zip(model.text_encoders, toks))
        ctx, pooled = model.encode_text(toks)
        piped = Pipeline(model).encode_prompt(prompts)
    assert isinstance(first, TextEncoderOutput) and first.pooled.shape == (2, 32)     # CLIP always pools
    assert torch.equal(ctx, torch.cat([first.hidden, second.hidden], dim=-1)) and ctx.shape == (2, 77, 64)
    assert torch.equal(pooled, second.pooled) and not torch.equal(pooled, first.pooled)
    assert torch.equal(piped.hidden, ctx) and torch.equal(piped.pooled, pooled)
