"""Start-up of `python sample.py`: building a model whose weights are about to be loaded (`empty_weights`) runs no
initialiser on the meta device. The first normal_ on a meta tensor (nn.Embedding's init, so every text encoder)
goes through a torch._refs decomposition that imports torch._dynamo: ~3 s of the 2-core VM's start-up before."""
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file
from torch import nn

from conftest import ROOT
from minisd.clip import CLIPTextModel
from minisd.config import CLIPTextConfig

TINY = os.path.join(ROOT, "weights", "minisd-tiny")


def test_loading_minisd_tiny_imports_no_dynamo():
    """A fresh interpreter that loads minisd-tiny never imports torch._dynamo (it did, from Embedding's init)."""
    code = ("import sys; from minisd.formats import load_model; load_model(sys.argv[1]); "
            "print('torch._dynamo' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, TINY], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False", "loading a model imported torch._dynamo (a meta-device initialiser ran)"


def test_empty_weights_skips_meta_init_only():
    from minisd.model import empty_weights
    cfg = CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                         num_hidden_layers=1, max_position_embeddings=7)
    with empty_weights():
        te = CLIPTextModel(cfg)
        real = torch.zeros(3, 5, device="cpu")   # an explicit real tensor is still initialised inside
        nn.init.normal_(real)
        nn.init.constant_(real[0], 2.0)
    assert all(p.is_meta for p in te.parameters())
    assert (real[0] == 2.0).all() and (real[1:] != 0).all()
    # outside the context nothing is changed: a fresh model is initialised as before
    torch.manual_seed(0)
    a = nn.Embedding(11, 4).weight
    torch.manual_seed(0)
    b = torch.randn(11, 4)
    assert torch.equal(a, b)


def test_loaded_weights_are_the_files_tensors():
    """Skipping the initialisers changes nothing that is loaded: every tensor is the file's, bit for bit."""
    from minisd.formats import load_model
    m = load_model(TINY)
    for name, module in (("unet", m.unet), ("vae", m.vae), ("text_encoder", m.text_encoders[0])):
        f = load_file(os.path.join(TINY, f"{name}.safetensors"))
        sd = module.state_dict()
        assert sd.keys() == f.keys()
        for k, v in f.items():
            assert sd[k].dtype == v.dtype and torch.equal(sd[k], v), (name, k)
