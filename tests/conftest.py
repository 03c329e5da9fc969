"""Shared test helpers. Tier 1 of the test plan: tiny random reference models vs minisd."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
REFERENCE = os.path.join(os.path.dirname(ROOT), "shared", "reference")
CLIP_VOCAB = os.path.join(ROOT, "weights", "tokenizers", "clip")
BERT_VOCAB = os.path.join(ROOT, "weights", "tokenizers", "bert")


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Give every parameter non-trivial random values (zero-initialised output layers and
    unit norm weights would hide mapping bugs). Norm weights stay near 1 so activations stay sane."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)
    return module.eval()   # reference models are built in train mode: dropout would make them random


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
