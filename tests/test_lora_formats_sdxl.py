"""LoRA files of an SDXL model (UNet + two text encoders) with diffusers as the oracle, by exact key names.

A tiny diffusers SDXL pipeline is saved, loaded in minisd, and given random non-zero LoRA in the UNet and both text
encoders. The diffusers/PEFT file minisd writes must be exactly the file diffusers itself writes for the same
adapters: `load_lora_weights` reads it, every key is consumed (the PEFT state of each component holds exactly our
keys, with equal tensors), and `save_lora_weights` of the loaded pipeline writes the same key set and tensors back.
The fused diffusers model then equals minisd's merged one. The kohya (SGM-named) SDXL file is read by diffusers to
the same numbers too.
"""
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from minisd import adapters
from minisd.formats import load_model
from minisd.formats.lora_files import load_diffusers, save_diffusers, save_kohya
from minisd.trainer import ATTN_MLP, TE_TARGETS
from test_e2e import tiny_sdxl_pipeline

torch.set_num_threads(1)
# fused diffusers vs merged minisd, fp32 CPU: measured max-abs 0.0 in the UNet and both text encoders (2-core x86 VM),
# against LoRA effects of about 1e-1. Bit-exact by construction: the same base weight plus (B·A)·s on both sides, and
# s = alpha/rank = 1/2 is a power of two, so folding it into B (the diffusers file) rounds nothing. Kept exact.
TOL = 0.0
PREFIXES = {"unet": "unet.", "text_encoder": "text_encoder.", "text_encoder_2": "text_encoder_2."}


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    path = tmp_path_factory.mktemp("lora_sdxl")
    pipe = tiny_sdxl_pipeline()
    pipe.save_pretrained(path)
    return str(path)


def adapted(folder):
    """minisd's model of the folder with random non-zero LoRA (rank 4, alpha 2: scale 1/2) everywhere."""
    model = load_model(folder).eval()
    assert len(model.text_encoders) == 2
    torch.manual_seed(0)
    adapters.inject(model.unet, "lora", ATTN_MLP, rank=4, alpha=2.0)
    for te in model.text_encoders:
        adapters.inject(te, "lora", TE_TARGETS, rank=4, alpha=2.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_up.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _canonical_te(key: str) -> str:
    """PEFT names of a transformers >= 5 CLIP text model may lack the `text_model.` wrapper; diffusers files keep it."""
    return key if key.startswith("text_model.") else "text_model." + key


def inputs(model):
    """Latents (non-square), timesteps, real token ids of each tokenizer (the pooled embedding is read at the first
    <|endoftext|>, which random ids lack), and a random SDXL vector y."""
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 4, 8, 12, generator=g), torch.tensor([10, 700])
    prompts = ["a small red circle at the top left", "two blue squares"]
    ids = [tok(prompts) for tok in model.tokenizers]
    y = torch.randn(2, 32 + 6 * 8, generator=g)
    return x, t, ids, y


def max_diffs(model, pipe):
    """(text encoder 1, text encoder 2, UNet) max-abs differences, minisd merged vs diffusers."""
    x, t, (ids1, ids2), y = inputs(model)
    adapters.merge(model)
    with torch.no_grad():
        h1 = pipe.text_encoder(ids1, output_hidden_states=True).hidden_states[-2]
        out2 = pipe.text_encoder_2(ids2, output_hidden_states=True)
        h2, pooled2 = out2.hidden_states[-2], out2.text_embeds
        ours1 = model.text_encoders[0](ids1)
        ours2, ours_pooled = model.text_encoders[1](ids2)
        ours1 = ours1[0] if isinstance(ours1, tuple) else ours1
        ctx = torch.cat([h1, h2], -1)
        ref = pipe.unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": y[:, :32],
                                                                            "time_ids": torch.zeros(2, 6)}).sample
        # minisd's y: pooled (32) + 6 sinusoids of width 8; feed the same vector through both
        from minisd.unet import sdxl_vector_cond
        ours = model.unet(x, t, ctx, y=sdxl_vector_cond(y[:, :32], torch.zeros(2, 6), embed_dim=8))
    return ((ours1 - h1).abs().max().item(), max((ours2 - h2).abs().max().item(),
            (ours_pooled - pooled2).abs().max().item()), (ours - ref).abs().max().item())


def test_diffusers_format_sdxl_exact_keys_and_values(xl, tmp_path):
    model = adapted(xl)
    path = str(tmp_path / "ours.safetensors")
    save_diffusers(model, path)
    ours = load_file(path)
    assert {k.split(".")[0] for k in ours} == set(PREFIXES)  # all three components in the file

    pipe = StableDiffusionXLPipeline.from_pretrained(xl)
    pipe.load_lora_weights(path, adapter_name="ours")
    # every key consumed: the PEFT state of each component is exactly our keys (prefix stripped), equal tensors
    for comp, prefix in PREFIXES.items():
        peft = get_peft_model_state_dict(getattr(pipe, comp), adapter_name="ours")
        if comp != "unet":
            peft = {_canonical_te(k): v for k, v in peft.items()}
        mine = {k[len(prefix):]: v for k, v in ours.items() if k.startswith(prefix)}
        assert set(peft) == set(mine), (comp, sorted(set(peft) ^ set(mine))[:6])
        bad = [k for k in mine if not torch.equal(peft[k], mine[k])]
        assert not bad, (comp, bad[:4])

    # the file diffusers writes for these adapters has our names exactly (and our tensors)
    StableDiffusionXLPipeline.save_lora_weights(
        str(tmp_path / "theirs"), unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name="ours"),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder, adapter_name="ours"),
        text_encoder_2_lora_layers=get_peft_model_state_dict(pipe.text_encoder_2, adapter_name="ours"))
    theirs = load_file(str(tmp_path / "theirs" / "pytorch_lora_weights.safetensors"))
    theirs = {k if k.startswith("unet.") else k.split(".", 1)[0] + "." + _canonical_te(k.split(".", 1)[1]): v
              for k, v in theirs.items()}
    assert set(theirs) == set(ours), sorted(set(theirs) ^ set(ours))[:6]
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)

    # and the numbers: diffusers fused == minisd merged, while the LoRA moves the outputs far more
    base = max_diffs(load_model(xl).eval(), pipe)  # the un-adapted minisd model vs the LoRA'd diffusers one
    pipe.fuse_lora()
    d = max_diffs(model, pipe)
    print(f"diffusers vs minisd max-abs: te1 {d[0]:.1e} te2 {d[1]:.1e} unet {d[2]:.1e}; LoRA effect {base}")
    assert max(d) <= TOL, d
    assert min(base) > 1e-2, base

    # minisd reads its own file back to the same adapters
    fresh = load_model(xl).eval()
    load_diffusers(fresh, path)
    assert max(max_diffs(fresh, pipe)) <= TOL


def test_kohya_sdxl_file_in_diffusers(xl, tmp_path):
    """The kohya SDXL file (SGM names, lora_te1_ / lora_te2_) through diffusers' kohya converter: same numbers,
    and every module diffusers adapted is one that minisd adapted (no key silently dropped: same module count)."""
    model = adapted(xl)
    path = str(tmp_path / "kohya.safetensors")
    save_kohya(model, path)
    keys = list(load_file(path))
    assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn1_to_q.lora_down.weight" in keys
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2.lora_up.weight" in keys
    pipe = StableDiffusionXLPipeline.from_pretrained(xl)
    pipe.load_lora_weights(path, adapter_name="ours")
    n_ours = len(adapters.group_by_module(adapters.adapter_state_dict(model)))
    # lora_A + lora_B per adapted module
    n_theirs = sum(len(get_peft_model_state_dict(getattr(pipe, c), adapter_name="ours")) // 2 for c in PREFIXES)
    assert n_theirs == n_ours, (n_theirs, n_ours)
    pipe.fuse_lora()
    d = max_diffs(model, pipe)
    print(f"kohya file, diffusers vs minisd max-abs: {d}")
    assert max(d) <= TOL, d
