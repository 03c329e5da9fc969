"""The prompts sample.py suggests are ones minisd-tiny draws right: whole captions of its world, generated as the
help's command lines would (parsed by sample.parse_args) and read back by the probe. ("a red circle on a blue
background", the old suggestion, came out as a blue circle on red.)"""
import os
import shlex

import pytest
import torch

import sample
from conftest import ROOT
from minisd import world

FIDELITY = ("shape", "colour", "size", "position", "background")


def example_commands():
    """The argument lists of the `python sample.py ...` lines of the help's examples that have a prompt."""
    cmds = []
    for line in getattr(sample, "EXAMPLES", "").splitlines():
        words = shlex.split(line, comments=True)
        if words[:2] == ["python", "sample.py"] and len(words) > 2 and not words[2].startswith("-"):
            cmds.append(words[2:])
    return cmds


def test_examples_and_default_prompt_are_whole_world_captions():
    cmds = example_commands()
    assert len(cmds) >= 3
    for prompt in [sample.DEFAULT_PROMPT] + [sample.parse_args(c).prompt for c in cmds]:
        world.parse_caption(prompt)  # raises on anything but a whole caption of the world


@pytest.fixture(scope="module")
def tiny_pipe():
    from minisd.formats import load_model
    from minisd.pipeline import Pipeline
    return Pipeline(load_model(os.path.join(ROOT, "weights", "minisd-tiny")), device="cpu")


@pytest.mark.parametrize("cmd", example_commands(), ids=lambda c: c[0][:40])
def test_example_is_drawn_right(cmd, tiny_pipe):
    from minisd.world.probe import load_probe
    torch.set_num_threads(1)
    a = sample.parse_args(cmd)
    steps, cfg = a.steps or sample.STEPS, sample.CFG if a.cfg is None else a.cfg  # main() fills them so
    images = tiny_pipe(a.prompt, steps=steps, sampler=a.sampler, cfg_scale=cfg, seed=a.seed, batch=1)
    got = load_probe(os.path.join(ROOT, "weights", "probe.safetensors")).predict(images)[0]
    want = world.parse_caption(a.prompt)
    assert {k: getattr(got, k) for k in FIDELITY} == {k: want[k] for k in FIDELITY}, a.prompt
