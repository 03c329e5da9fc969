"""Hold tests/kohya_lora.py (the kohya-layout LoRA generator the tests use) to kohya sd-scripts' own code, by hand.

CI cannot run this: sd-scripts is not on PyPI and CI has no network. With a checkout of sd-scripts at hand it builds
kohya's own `networks.lora.LoRANetwork` (dim 4, alpha 2, conv_dim 2, conv_alpha 1) and compares its state dict - every
key and shape - with what the generator writes for the same models:

    SD1   the tiny diffusers UNet of the tests (kohya's original_unet.py has diffusers' names) + a CLIP text model
    SDXL  full size: kohya's own SdxlUNet2DConditionModel vs the generator's `sgm_tree` over a full-size diffusers
          SDXL UNet (both on the meta device, no memory), + two CLIP text models (lora_te1_ / lora_te2_)

    git clone https://github.com/kohya-ss/sd-scripts /tmp/sd-scripts
    python tools/check_kohya_fixture.py /tmp/sd-scripts

Result at sd-scripts 48d368fa (2026-02-16): SD1 387 keys equal, SDXL 2436 keys equal, no shape differs, alpha fp32.
sd-scripts imports torchvision / cv2 at module level for its datasets; where they are missing, empty stand-ins are
installed (nothing of them runs here).
"""
import importlib.util
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stub_missing(names):
    for name in names:
        if importlib.util.find_spec(name) is None:
            for full in (name, name + ".transforms"):
                mod = types.ModuleType(full)
                mod.__path__ = []
                mod.__file__ = __file__
                mod.__getattr__ = lambda k: type(k, (), {"__init__": lambda self, *a, **kw: None})
                sys.modules[full] = mod


def kohya_keys(lora_mod, tes, unet, **kw):
    net = lora_mod.LoRANetwork(tes if len(tes) > 1 else tes[0], unet, lora_dim=4, alpha=2.0, conv_lora_dim=2,
                               conv_alpha=1.0, **kw)
    net.apply_to(tes, unet, True, True)  # registers the LoRA modules (state_dict is empty before)
    return {k: (tuple(v.shape), v.dtype) for k, v in net.state_dict().items()}


def generator_keys(tes, unet):
    import torch
    from kohya_lora import network_modules
    out = {}
    for name, mod, dim, _ in network_modules(tes, unet, 4, 2.0, 2, 1.0):
        conv = mod.__class__.__name__ == "Conv2d"
        out[name + ".alpha"] = ((), torch.float32)
        out[name + ".lora_down.weight"] = ((dim, mod.in_channels, *mod.kernel_size) if conv else
                                           (dim, mod.in_features), torch.float32)
        out[name + ".lora_up.weight"] = ((mod.out_channels, dim, 1, 1) if conv else (mod.out_features, dim),
                                         torch.float32)
    return out


def report(label, a, b) -> bool:
    same = a == b
    print(f"{label}: kohya {len(a)} keys, generator {len(b)}: " +
          ("equal (keys, shapes, dtypes)" if same else f"DIFFER, e.g. {sorted(set(a) ^ set(b))[:6]} "
                                                      f"{[k for k in a if k in b and a[k] != b[k]][:6]}"))
    return same


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not os.path.isfile(os.path.join(argv[0], "networks", "lora.py")):
        print("error: give the path of an sd-scripts checkout (with networks/lora.py)", file=sys.stderr)
        return 2
    import diffusers  # noqa: F401  (before the stand-ins: diffusers probes torchvision's spec)
    import torch
    from diffusers import UNet2DConditionModel
    stub_missing(["torchvision", "cv2"])
    sys.path[:0] = [argv[0], os.path.join(ROOT, "tests"), ROOT]
    torch.set_num_threads(1)
    import networks.lora as kohya_lora_mod
    from library.sdxl_original_unet import SdxlUNet2DConditionModel
    from kohya_lora import sgm_tree, transformers4_tree
    from test_e2e import tiny_clip, tiny_unet

    unet = tiny_unet(3, layers_per_block=2)
    te = transformers4_tree(tiny_clip(2))
    ok = report("SD1 (tiny)", kohya_keys(kohya_lora_mod, [te], unet), generator_keys([te], unet))

    with torch.device("meta"):
        kunet = SdxlUNet2DConditionModel()
        dunet = UNet2DConditionModel(  # diffusers' SDXL base 1.0 unet/config.json
            sample_size=128, cross_attention_dim=2048, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    tes = [transformers4_tree(tiny_clip(2)), transformers4_tree(tiny_clip(3, act="gelu", projection=True))]
    ok &= report("SDXL (full-size UNet)", kohya_keys(kohya_lora_mod, tes, kunet, is_sdxl=True),
                 generator_keys(tes, sgm_tree(dunet)))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
