"""The single-file round trip starts from a file that holds what minisd keeps aside on import: the DDPM schedule
buffers, `model_ema.decay` / `num_updates`, `logvar`, `denoiser.sigmas`, the HF CLIP `position_ids`, and the OpenCLIP
tensors the text encoder does not compute with (`logit_scale`, `attn_mask`, a block after the layer the UNet reads).
`convert.py FILE --out DIR` then `convert.py DIR --to single-file OUT` must give back every tensor of FILE - these
included - with equal names, dtypes and values (single_file.py `split_checkpoint` -> extras.safetensors ->
export.py `join_checkpoint`). SD1 (one HF CLIP) and SDXL (HF CLIP + OpenCLIP)."""
import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import convert  # noqa: E402
from minisd.config import TINY  # noqa: E402
from minisd.formats.export import components  # noqa: E402
from minisd.formats.single_file import SCHEDULE_BUFFERS, join_checkpoint  # noqa: E402
from minisd.model import StableDiffusion, load_minisd_folder  # noqa: E402
from conftest import randomize, save_tiny_sdxl  # noqa: E402


def kept_aside(family: str, g: torch.Generator) -> dict:
    """Tensors of an official file that minisd does not compute with, with non-trivial values."""
    out = {name: torch.rand(1000, generator=g) for name in SCHEDULE_BUFFERS}
    out.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1234, dtype=torch.int32),
                "logvar": torch.randn(1000, generator=g), "denoiser.sigmas": torch.rand(1000, generator=g)})
    hf = "cond_stage_model.transformer." if family == "sd1" else "conditioner.embedders.0.transformer."
    out[hf + "text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
    if family == "sdxl":
        oc = "conditioner.embedders.1.model."
        out.update({oc + "logit_scale": torch.tensor(4.6052), oc + "attn_mask": torch.randn(77, 77, generator=g),
                    oc + "transformer.resblocks.2.ln_1.weight": torch.randn(32, generator=g),
                    oc + "transformer.resblocks.2.ln_1.bias": torch.randn(32, generator=g)})
    return out


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_single_file_round_trip_keeps_what_was_set_aside(tmp_path, family, capsys):
    if family == "sd1":
        torch.manual_seed(0)
        model = randomize(StableDiffusion(TINY), 0, 0.05)
    else:
        model = load_minisd_folder(save_tiny_sdxl(tmp_path / "xl"))
    g = torch.Generator().manual_seed(1)
    extras = kept_aside(family, g)
    sd = {**join_checkpoint(components(model), family, model.cfg), **extras}
    src = str(tmp_path / "source.safetensors")
    save_file({k: v.contiguous() for k, v in sd.items()}, src,
              metadata={"format": "pt", "minisd_config": json.dumps(model.cfg.to_dict())})

    assert convert.main([src, "--out", str(tmp_path / "m")]) == 0, capsys.readouterr().err
    kept = load_file(str(tmp_path / "m" / "extras.safetensors"))
    assert set(extras) <= set(kept), sorted(set(extras) - set(kept))
    out = str(tmp_path / "again.safetensors")
    assert convert.main([str(tmp_path / "m"), "--to", "single-file", out]) == 0, capsys.readouterr().err

    back = load_file(out)
    assert set(extras) <= set(back), f"set aside on import, missing on export: {sorted(set(extras) - set(back))}"
    assert set(back) == set(sd), sorted(set(back) ^ set(sd))[:6]
    bad = [k for k in sd if back[k].dtype != sd[k].dtype or not torch.equal(back[k], sd[k])]
    assert not bad, bad[:6]
