"""LoRA files laid out exactly as kohya sd-scripts' own code writes them (test-only fixture generator).

sd-scripts is not on PyPI and CI has no network, so its network module cannot be imported here. This file re-states,
line for line, the parts of it that decide what a LoRA file holds, and applies them to module trees built from the
diffusers / transformers classes the tests use as oracles. Port of kohya-ss/sd-scripts @ 48d368fa (2026-02-16):

    networks/lora.py  LoRANetwork.__init__.create_modules   which modules get a LoRA and the key of each:
                          for name, module in root.named_modules():
                              if module.__class__.__name__ in target_replace_modules:
                                  for child_name, child_module in module.named_modules():
                                      Linear, or Conv2d (1x1: network dim; 3x3: conv_dim, only when given)
                                      lora_name = (prefix + "." + name + "." + child_name).replace(".", "_")
                      prefixes lora_unet, lora_te (one text encoder), lora_te1 / lora_te2 (SDXL)
                      targets: UNet "Transformer2DModel"; with conv_dim also "ResnetBlock2D", "Downsample2D",
                      "Upsample2D" (so their Linear time_emb_proj and 1x1 shortcut get the network dim too);
                      text encoders "CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"
    networks/lora.py  LoRAModule.__init__                   the tensors: lora_down = Linear(in, dim) or
                      Conv2d(in, dim, base kernel, stride, padding), lora_up = Linear(dim, out) or Conv2d(dim, out,
                      1x1), both bias-free; alpha = dim if alpha is None or 0; register_buffer("alpha",
                      torch.tensor(alpha)); down kaiming_uniform(a=√5), up zeros (here: random, as after training)
    networks/lora.py  LoRANetwork.save_weights              state_dict() -> "<lora_name>.alpha", ".lora_down.weight",
                      ".lora_up.weight"; metadata + sshs_model_hash / sshs_legacy_hash (train_util.
                      precalculate_safetensors_hashes over the tensors and the ss_* entries only)
    train_network.py  metadata: ss_network_module, ss_network_dim, ss_network_alpha, ss_base_model_version
                      ("sd_v1", "sdxl_base_v1-0"), ss_v2, ..., every value str()-ed; ss_network_args (JSON)
                      holds conv_dim / conv_alpha; library/sai_model_spec.py: modelspec.architecture
                      "stable-diffusion-v1/lora", "stable-diffusion-xl-v1-base/lora"

The UNet kohya trains. SD1: library/original_unet.py repeats diffusers' module names (down_blocks.0.attentions.0,
resnets.0.conv1, downsamplers.0.conv, ...), so a diffusers UNet2DConditionModel is that tree. SDXL:
library/sdxl_original_unet.py is named like Stability's checkpoint (input_blocks.4.1, middle_block.1,
output_blocks.2.2.conv; ResnetBlock2D with in_layers / emb_layers / out_layers / skip_connection, Downsample2D.op),
so `sgm_tree` re-parents the diffusers UNet's own modules into that shape (the same tensors, SGM paths); the tests
check the tree against diffusers' single-file converter, which reads Stability's layout.
"""
from __future__ import annotations

import hashlib
import json
import math
from io import BytesIO

import safetensors.torch
import torch
import torch.nn as nn

UNET_TARGET_REPLACE_MODULE = ["Transformer2DModel"]
UNET_TARGET_REPLACE_MODULE_CONV2D_3X3 = ["ResnetBlock2D", "Downsample2D", "Upsample2D"]
TEXT_ENCODER_TARGET_REPLACE_MODULE = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
LORA_PREFIX_UNET = "lora_unet"
LORA_PREFIX_TEXT_ENCODER = "lora_te"
LORA_PREFIX_TEXT_ENCODER1 = "lora_te1"
LORA_PREFIX_TEXT_ENCODER2 = "lora_te2"


# --------------------------------------------------------------------------- SDXL: the tree kohya's SDXL UNet has
class ResnetBlock2D(nn.Module):
    """sdxl_original_unet.ResnetBlock2D's names over a diffusers ResnetBlock2D's modules (shared, not copied)."""

    def __init__(self, res):
        super().__init__()
        self.in_layers = nn.Sequential(res.norm1, nn.SiLU(), res.conv1)
        self.emb_layers = nn.Sequential(nn.SiLU(), res.time_emb_proj)
        self.out_layers = nn.Sequential(res.norm2, nn.SiLU(), nn.Identity(), res.conv2)
        self.skip_connection = res.conv_shortcut if res.conv_shortcut is not None else nn.Identity()


class Downsample2D(nn.Module):
    def __init__(self, down):
        super().__init__()
        self.op = down.conv


class Upsample2D(nn.Module):
    def __init__(self, up):
        super().__init__()
        self.conv = up.conv


def sgm_tree(unet) -> nn.Module:
    """The module tree of kohya's SdxlUNet2DConditionModel (Stability's names) holding `unet`'s modules.
    Transformer2DModel is the diffusers module itself: its inner names (proj_in, transformer_blocks.0.attn1.to_q,
    ff.net.0.proj, ...) are the same in both."""
    root = nn.Module()
    te = unet.time_embedding
    root.time_embed = nn.Sequential(te.linear_1, nn.SiLU(), te.linear_2)
    if getattr(unet, "add_embedding", None) is not None:
        ae = unet.add_embedding
        root.label_emb = nn.Sequential(nn.Sequential(ae.linear_1, nn.SiLU(), ae.linear_2))
    blocks = [nn.Sequential(unet.conv_in)]
    for blk in unet.down_blocks:
        for j, res in enumerate(blk.resnets):
            attn = [blk.attentions[j]] if getattr(blk, "attentions", None) is not None else []
            blocks.append(nn.ModuleList([ResnetBlock2D(res)] + attn))
        if blk.downsamplers is not None:
            blocks.append(nn.Sequential(Downsample2D(blk.downsamplers[0])))
    root.input_blocks = nn.ModuleList(blocks)
    mid = unet.mid_block
    root.middle_block = nn.ModuleList([ResnetBlock2D(mid.resnets[0]), mid.attentions[0], ResnetBlock2D(mid.resnets[1])])
    blocks = []
    for blk in unet.up_blocks:
        for j, res in enumerate(blk.resnets):
            layers = [ResnetBlock2D(res)]
            if getattr(blk, "attentions", None) is not None:
                layers.append(blk.attentions[j])
            if j == len(blk.resnets) - 1 and blk.upsamplers is not None:
                layers.append(Upsample2D(blk.upsamplers[0]))
            blocks.append(nn.ModuleList(layers))
    root.output_blocks = nn.ModuleList(blocks)
    root.out = nn.ModuleList([unet.conv_norm_out, nn.SiLU(), unet.conv_out])
    return root


# --------------------------------------------------------------------------- the text encoders kohya loads
def transformers4_tree(te) -> nn.Module:
    """The module tree of a CLIP text model under transformers 4.x, which sd-scripts pins (requirements.txt:
    transformers==4.54.1): CLIPTextModel holds the transformer as `text_model`, so kohya's names read
    lora_te_text_model_encoder_layers_0_... . transformers 5 (installed here) dropped that wrapper; put back, sharing
    the modules. A model that still has it is returned as is."""
    if hasattr(te, "text_model"):
        return te
    root = nn.Module()
    root.text_model = te
    return root


# --------------------------------------------------------------------------- networks/lora.py
def create_modules(prefix, root, target_replace_modules, lora_dim, alpha, conv_lora_dim=None, conv_alpha=None):
    """[(lora_name, child module, dim, alpha)] as LoRANetwork.create_modules picks them (the "normal" branch:
    no block dims, no modules_dim)."""
    loras = []
    for name, module in root.named_modules():
        if module.__class__.__name__ in target_replace_modules:
            for child_name, child_module in module.named_modules():
                is_linear = child_module.__class__.__name__ == "Linear"
                is_conv2d = child_module.__class__.__name__ == "Conv2d"
                is_conv2d_1x1 = is_conv2d and child_module.kernel_size == (1, 1)
                if is_linear or is_conv2d:
                    lora_name = prefix + "." + name + "." + child_name
                    lora_name = lora_name.replace(".", "_")
                    dim = None
                    if is_linear or is_conv2d_1x1:
                        dim, a = lora_dim, alpha
                    elif conv_lora_dim is not None:
                        dim, a = conv_lora_dim, conv_alpha
                    if dim is None or dim == 0:
                        continue
                    loras.append((lora_name, child_module, dim, a))
    return loras


def network_modules(text_encoders, unet, lora_dim, alpha, conv_lora_dim=None, conv_alpha=None):
    """LoRANetwork.__init__: text encoders first (lora_te, or lora_te1 / lora_te2), then the UNet; names unique."""
    loras = []
    for i, te in enumerate(text_encoders):
        prefix = LORA_PREFIX_TEXT_ENCODER if len(text_encoders) == 1 else \
            (LORA_PREFIX_TEXT_ENCODER1 if i == 0 else LORA_PREFIX_TEXT_ENCODER2)
        loras += create_modules(prefix, te, TEXT_ENCODER_TARGET_REPLACE_MODULE, lora_dim, alpha)
    targets = list(UNET_TARGET_REPLACE_MODULE)
    if conv_lora_dim is not None:
        targets += UNET_TARGET_REPLACE_MODULE_CONV2D_3X3
    loras += create_modules(LORA_PREFIX_UNET, unet, targets, lora_dim, alpha, conv_lora_dim, conv_alpha)
    names = [n for n, *_ in loras]
    assert len(set(names)) == len(names), "duplicated lora name"
    return loras


def lora_module_tensors(org_module, lora_dim, alpha, gen):
    """LoRAModule.__init__'s tensors, in its state_dict order (alpha buffer, then lora_down, lora_up)."""
    if org_module.__class__.__name__ == "Conv2d":
        down = nn.Conv2d(org_module.in_channels, lora_dim, org_module.kernel_size, org_module.stride,
                         org_module.padding, bias=False)
        up = nn.Conv2d(lora_dim, org_module.out_channels, (1, 1), (1, 1), bias=False)
    else:
        down = nn.Linear(org_module.in_features, lora_dim, bias=False)
        up = nn.Linear(lora_dim, org_module.out_features, bias=False)
    alpha = lora_dim if alpha is None or alpha == 0 else alpha
    with torch.no_grad():
        # kohya: kaiming_uniform_(down, a=√5) and zeros_(up) at the start; a trained file has both non-zero
        bound = 1.0 / math.sqrt(down.weight[0].numel())  # kaiming_uniform(a=√5) = U(-1/√fan_in, 1/√fan_in)
        down.weight.copy_((torch.rand(down.weight.shape, generator=gen) * 2 - 1) * bound)
        up.weight.copy_(torch.randn(up.weight.shape, generator=gen) * 0.05)
    return {"alpha": torch.tensor(alpha), "lora_down.weight": down.weight.detach(),
            "lora_up.weight": up.weight.detach()}


def precalculate_safetensors_hashes(tensors, metadata):
    """train_util.precalculate_safetensors_hashes: (addnet hash over the tensor bytes, legacy hash of 64 KiB
    at 1 MiB)."""
    metadata = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    b = BytesIO(safetensors.torch.save(tensors, metadata))
    n = int.from_bytes(b.read(8), "little")
    b.seek(n + 8)
    model_hash = hashlib.sha256(b.read()).hexdigest()
    b.seek(0x100000)
    legacy_hash = hashlib.sha256(b.read(0x10000)).hexdigest()[0:8]
    return model_hash, legacy_hash


def write_kohya_lora(path, text_encoders, unet, *, sdxl, lora_dim=4, alpha=2.0, conv_dim=None, conv_alpha=None,
                     seed=0):
    """Write what `train_network.py --network_module networks.lora --network_dim D --network_alpha A
    [--network_args conv_dim=C conv_alpha=CA]` saves (fp32, --save_precision float). `unet` is the tree kohya's own UNet
    has (SD1: the diffusers UNet; SDXL: `sgm_tree`), `text_encoders` the trees kohya walks (`transformers4_tree` for
    the names of kohya's pinned transformers; the bare transformers-5 model for what kohya writes under it).
    Returns {lora_name: (module, dim, alpha)} for the oracle."""
    gen = torch.Generator().manual_seed(seed)
    loras = network_modules(text_encoders, unet, lora_dim, alpha, conv_dim, conv_alpha)
    sd, out = {}, {}
    for lora_name, module, dim, a in loras:
        for k, v in lora_module_tensors(module, dim, a, gen).items():
            sd[f"{lora_name}.{k}"] = v.contiguous()
        out[lora_name] = (module, dim, float(a if a else dim))
    net_args = {"conv_dim": str(conv_dim), "conv_alpha": str(conv_alpha)} if conv_dim else None
    metadata = {"ss_session_id": "1234567890", "ss_output_name": "kohya_fixture", "ss_network_module": "networks.lora",
                "ss_network_dim": lora_dim, "ss_network_alpha": alpha, "ss_network_dropout": None,
                "ss_mixed_precision": "no", "ss_v2": False,
                "ss_base_model_version": "sdxl_base_v1-0" if sdxl else "sd_v1", "ss_clip_skip": None,
                "ss_seed": seed, "ss_sd_scripts_commit_hash": "48d368fa557731ad0488c07304dfeba8c07910eb"}
    if net_args:
        metadata["ss_network_args"] = json.dumps(net_args)
    metadata = {k: str(v) for k, v in metadata.items()}
    metadata["modelspec.sai_model_spec"] = "1.0.1"
    metadata["modelspec.architecture"] = ("stable-diffusion-xl-v1-base" if sdxl else "stable-diffusion-v1") + "/lora"
    metadata["modelspec.implementation"] = "https://github.com/Stability-AI/generative-models" if sdxl else "diffusers"
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = precalculate_safetensors_hashes(sd, metadata)
    safetensors.torch.save_file(sd, path, metadata)
    return out
