"""The files the fine-tuning methods write (issue 17: full fine-tune, textual inversion, hypernetworks, DreamBooth's
class images; issue 18: the distilled student) go through the same safe writes as the adapter files (issue 15): a link planted at any of their names
in a resumed run folder, or in a class-image folder, is replaced by the new file, never written through."""
import os

import pytest
import torch

import train
from minisd import world
from safe_helpers import call, leftovers, ok, plant_link, refused

torch.set_num_threads(1)
FAST = ["--model", "tiny-random", "--threads", "1", "--no-progress", "--no-samples", "--batch-size", "1",
        "--resolution", "32"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return world.write_folder(str(tmp_path_factory.mktemp("world")), 3, seed=0, style="striped")


@pytest.mark.parametrize("flags, outputs", [
    (["--method", "full"], ["model.safetensors"]),
    (["--method", "ti", "--ti-token", "<sks>", "--ti-init", "circle"],
     ["embedding.safetensors", "learned_embeds.safetensors"]),
    (["--method", "hypernetwork"], ["hypernetwork.safetensors"]),
    (["--distill", "small"], ["student.safetensors"]),
])
def test_method_outputs_never_written_through_links(tmp_path, data_dir, capfd, flags, outputs):
    run = str(tmp_path / "run")
    ok(call(capfd, "train.py", *FAST, *flags, "--data", data_dir, "--out", run, "--max-steps", "1",
            "--save-every", "1"))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in outputs:
        assert os.path.isfile(os.path.join(run, name)), name  # the method wrote it: the name is one it uses
        os.remove(os.path.join(run, name))
        plant_link(os.path.join(run, name), str(victim))
    ok(call(capfd, "train.py", "--resume", run, "--max-steps", "2"))  # writes its outputs (and model/ ...) again
    assert victim.read_text() == "precious"
    for name in outputs:
        path = os.path.join(run, name)
        assert os.path.isfile(path) and not os.path.islink(path), name
    assert not leftovers(run)


def test_class_images_never_written_through_links(tmp_path, data_dir, capfd):
    """DreamBooth draws missing class images into --class-data: a link planted at a name it writes (the caption) is
    replaced, not followed; a link at an image name is an image of the user's that does not read, and one at the
    folder's record a record that does not read: each refused in one line, what they point to untouched."""
    cls = tmp_path / "class"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    plant_link(str(cls / "class_00000.txt"), str(victim))
    flags = [*FAST, "--data", data_dir, "--max-steps", "1", "--instance-prompt", "a sks emblem", "--class-prompt",
             "an emblem", "--class-data", cls, "--num-class-images", "1", "--sample-steps", "2"]
    ok(call(capfd, "train.py", *flags, "--out", tmp_path / "run"))
    assert victim.read_text() == "precious"
    for name in ("class_00000.png", "class_00000.txt", "class_images.json"):
        assert os.path.isfile(cls / name) and not os.path.islink(cls / name), name
    assert not leftovers(str(cls))
    other = tmp_path / "other"
    plant_link(str(other / "class_00000.png"), str(victim))
    refused(call(capfd, "train.py", *flags[:-6], "--class-data", other, "--num-class-images", "1", "--sample-steps",
                 "2", "--out", tmp_path / "run2"), str(other))
    assert victim.read_text() == "precious" and not os.path.exists(tmp_path / "run2")
    # the folder's record as a link to something else: refused in one line naming it, nothing written through
    third = tmp_path / "third"
    plant_link(str(third / "class_images.json"), str(victim))
    refused(call(capfd, "train.py", *flags[:-6], "--class-data", third, "--num-class-images", "1", "--sample-steps",
                 "2", "--out", tmp_path / "run3"), "class_images.json")
    assert victim.read_text() == "precious" and not os.path.exists(tmp_path / "run3")
