"""Hold tests/kohya_lora.py (the kohya-layout LoRA generator the tests use) to kohya sd-scripts' own code, by hand.

CI cannot run this: sd-scripts is not on PyPI and CI has no network. With a checkout of sd-scripts at hand it builds
kohya's own `networks.lora.LoRANetwork` (dim 4, alpha 2, conv_dim 2, conv_alpha 1) and compares its state dict - every
key and shape - with what the generator writes for the same models:

    SD1   the tiny diffusers UNet of the tests (kohya's original_unet.py has diffusers' names) + a CLIP text model
    SDXL  full size: kohya's own SdxlUNet2DConditionModel vs the generator's `sgm_tree` over a full-size diffusers
          SDXL UNet (both on the meta device, no memory), + two CLIP text models (lora_te1_ / lora_te2_)

    git clone https://github.com/kohya-ss/sd-scripts /tmp/sd-scripts
    python tools/check_kohya_fixture.py /tmp/sd-scripts
    python tools/check_kohya_fixture.py /tmp/sd-scripts --write tests/golden     # and write the two fixtures below

Result at sd-scripts 48d368fa (2026-02-16): SD1 387 keys equal, SDXL 2436 keys equal, no shape differs, alpha fp32.

The other direction too: minisd's own kohya file (LoRA on attention, MLP, projections, ResBlock 3x3 convs and both /
one text encoders, alpha != rank) read by kohya's `create_network_from_weights` and merged by its `merge_to` at strength
0.7: every module of the file found in kohya's tree, and kohya's merged weights equal minisd's merged model.
Result: SD1 76 modules, SDXL 128 modules, all found; max |kohya - minisd| 1.2e-7 / 6.0e-8 (fp32 rounding; kohya
merges a 3x3 conv with conv2d, minisd with a matmul; updates of order 1).

`--write DIR` saves, with kohya's own `LoRANetwork.save_weights` (fp16, kohya's usual --save_precision; its
sshs_* hashes), the networks it builds for the tests' tiny SD1 UNet + CLIP (conv_dim 2: LoCon) and for the tiny SDXL
pipeline (two CLIPs, `sgm_tree` UNet), their lora_up filled with seeded noise as after training:
tests/golden/kohya_sd1_locon.safetensors and kohya_sdxl.safetensors, read by tests/test_kohya_files.py.

sd-scripts imports torchvision / cv2 at module level for its datasets; where they are missing, empty stand-ins are
installed (nothing of them runs here). Of library/train_util.py (which imports half the training stack) only the three
hash functions save_weights calls are executed, from the checkout's own source.
"""
import ast
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


def kohya_network(lora_mod, tes, unet, **kw):
    net = lora_mod.LoRANetwork(tes if len(tes) > 1 else tes[0], unet, lora_dim=4, alpha=2.0, conv_lora_dim=2,
                               conv_alpha=1.0, **kw)
    net.apply_to(tes, unet, True, True)  # registers the LoRA modules (state_dict is empty before)
    return net


def kohya_keys(net):
    return {k: (tuple(v.shape), v.dtype) for k, v in net.state_dict().items()}


def train_util_hashes(sd_scripts):
    """A `library.train_util` holding only the checkout's own hash functions (the rest is not importable here)."""
    path = os.path.join(sd_scripts, "library", "train_util.py")
    tree = ast.parse(open(path).read())
    wanted = {"precalculate_safetensors_hashes", "addnet_hash_legacy", "addnet_hash_safetensors"}
    body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    mod = types.ModuleType("library.train_util")
    import hashlib
    from io import BytesIO
    import safetensors.torch
    mod.__dict__.update(hashlib=hashlib, BytesIO=BytesIO, safetensors=safetensors)
    exec(compile(ast.Module(body=body, type_ignores=[]), path, "exec"), mod.__dict__)
    return mod


def write_fixture(net, path, sdxl, seed):
    """Fill lora_up with seeded noise (as after training) and save with kohya's own save_weights, fp16."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("lora_up.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "2.0",
            "ss_network_args": '{"conv_dim": "2", "conv_alpha": "1.0"}', "ss_v2": "False",
            "ss_base_model_version": "sdxl_base_v1-0" if sdxl else "sd_v1", "ss_mixed_precision": "fp16",
            "ss_output_name": os.path.basename(path)[:-len(".safetensors")],
            "modelspec.architecture": ("stable-diffusion-xl-v1-base" if sdxl else "stable-diffusion-v1") + "/lora"}
    net.save_weights(path, torch.float16, meta)
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


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


def minisd_file_in_kohya(lora_mod, folder, pipe, sdxl, tmp) -> bool:
    """minisd's kohya file -> kohya's create_network_from_weights + merge_to; weights vs minisd's merge."""
    import torch
    from safetensors.torch import load_file
    from kohya_lora import sgm_tree, transformers4_tree
    from minisd import adapters
    from minisd.formats.lora_files import save_kohya
    from test_sample_lora import adapted
    model = adapted(folder, "lora", conv=True, alpha=3.0)
    path = os.path.join(tmp, "minisd_kohya.safetensors")
    save_kohya(model, path)
    adapters.set_scale(model, 0.7)
    adapters.merge(model)
    ours = dict(model.state_dict())
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if sdxl else [])
    tes = [transformers4_tree(te) for te in encoders]
    tree = sgm_tree(pipe.unet)
    weights = load_file(path)
    net, _ = lora_mod.create_network_from_weights(0.7, path, None, tes if sdxl else tes[0], tree if sdxl else pipe.unet,
                                                  weights_sd=weights, for_inference=True)
    names = {k.split(".")[0] for k in weights}
    found = {lora.lora_name for lora in net.text_encoder_loras + net.unet_loras}
    net.merge_to(tes, tree if sdxl else pipe.unet, weights, torch.float32, "cpu")
    paths = {id(m): "unet." + p for p, m in tree.named_modules()}
    for i, te in enumerate(tes):
        paths.update({id(m): f"text_encoders.{i}.{p}" for p, m in te.named_modules()})
    diffs = [(lora.org_module.weight - ours[paths[id(lora.org_module)] + ".weight"]).abs().max().item()
             for lora in net.text_encoder_loras + net.unet_loras]
    print(f"minisd's {'SDXL' if sdxl else 'SD1'} kohya file in kohya: {len(names)} modules, {len(found & names)} found "
          f"by kohya; max |kohya merge - minisd merge| {max(diffs):.1e}")
    return found == names and max(diffs) < 1e-6


def report(label, a, b) -> bool:
    same = a == b
    print(f"{label}: kohya {len(a)} keys, generator {len(b)}: " +
          ("equal (keys, shapes, dtypes)" if same else f"DIFFER, e.g. {sorted(set(a) ^ set(b))[:6]} "
                                                      f"{[k for k in a if k in b and a[k] != b[k]][:6]}"))
    return same


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out_dir = None
    if len(argv) == 3 and argv[1] == "--write":
        argv, out_dir = argv[:1], argv[2]
    if len(argv) != 1 or not os.path.isfile(os.path.join(argv[0], "networks", "lora.py")):
        print("error: give the path of an sd-scripts checkout (with networks/lora.py) [--write DIR]", file=sys.stderr)
        return 2
    import diffusers  # noqa: F401  (before the stand-ins: diffusers probes torchvision's spec)
    import torch
    from diffusers import UNet2DConditionModel
    stub_missing(["torchvision", "cv2"])
    sys.path[:0] = [argv[0], os.path.join(ROOT, "tests"), ROOT]
    torch.set_num_threads(1)
    import library
    library.train_util = sys.modules["library.train_util"] = train_util_hashes(argv[0])
    import networks.lora as kohya_lora_mod
    from library.sdxl_original_unet import SdxlUNet2DConditionModel
    from kohya_lora import sgm_tree, transformers4_tree
    from test_e2e import tiny_clip, tiny_unet

    unet = tiny_unet(3, layers_per_block=2)
    te = transformers4_tree(tiny_clip(2))
    net = kohya_network(kohya_lora_mod, [te], unet)
    ok = report("SD1 (tiny)", kohya_keys(net), generator_keys([te], unet))
    if out_dir:
        write_fixture(net, os.path.join(out_dir, "kohya_sd1_locon.safetensors"), False, 11)
        from test_e2e import tiny_sdxl_pipeline
        pipe = tiny_sdxl_pipeline()
        tes = [transformers4_tree(pipe.text_encoder), transformers4_tree(pipe.text_encoder_2)]
        net = kohya_network(kohya_lora_mod, tes, sgm_tree(pipe.unet), is_sdxl=True)
        write_fixture(net, os.path.join(out_dir, "kohya_sdxl.safetensors"), True, 12)

    import tempfile
    from test_e2e import tiny_sdxl_pipeline
    from test_sample_lora import sd1_pipe
    with tempfile.TemporaryDirectory() as tmp:
        for sdxl, pipe in ((False, sd1_pipe()), (True, tiny_sdxl_pipeline())):
            folder = os.path.join(tmp, "xl" if sdxl else "sd1")
            pipe.save_pretrained(folder)
            ok &= minisd_file_in_kohya(kohya_lora_mod, folder, pipe, sdxl, tmp)

    with torch.device("meta"):
        kunet = SdxlUNet2DConditionModel()
        dunet = UNet2DConditionModel(  # diffusers' SDXL base 1.0 unet/config.json
            sample_size=128, cross_attention_dim=2048, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    tes = [transformers4_tree(tiny_clip(2)), transformers4_tree(tiny_clip(3, act="gelu", projection=True))]
    ok &= report("SDXL (full-size UNet)", kohya_keys(kohya_network(kohya_lora_mod, tes, kunet, is_sdxl=True)),
                 generator_keys(tes, sgm_tree(dunet)))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
