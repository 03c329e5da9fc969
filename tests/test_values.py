"""Unit tests of the checks on values that enter from outside: the shared image reader (minisd/formats/images.py),
the value checks (minisd/formats/checks.py, minisd/train/values.py, config.check_config), the DDIM grid limit and
metadata.jsonl paths. Expected values are computed by hand in the comments."""
import json
import math
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from minisd.config import SD15, TINY, ModelConfig, check_config
from minisd.formats.checks import check_device, check_size, number, read_json, scheduler_keys
from minisd.formats.images import read_image, read_text_file, to_8bit


# ----------------------------------------------------------------------------------------------- images
def test_16bit_grey_is_scaled_not_clipped(tmp_path):
    """round(v * 255 / 65535) per pixel, worked by hand: 0 -> 0; 128 -> 0.498 -> 0; 129 -> 0.502 -> 1;
    5000 -> 19.455 -> 19; 32768 -> 127.502 -> 128; 40000 -> 155.645 -> 156; 65535 -> 255. (convert("RGB") of the
    I;16 image gives 255 for every value above 255: a white picture.)"""
    values = np.array([[0, 128, 129, 5000], [32768, 40000, 65535, 257]], dtype=np.uint16)  # 2 x 4: not square
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    img = read_image(str(tmp_path / "g16.png"))
    want = np.array([[0, 0, 1, 19], [128, 156, 255, 1]], dtype=np.uint8)
    assert img.size == (4, 2) and img.mode == "RGB"
    got = np.asarray(img)
    assert (got[..., 0] == want).all() and (got[..., 1] == want).all() and (got[..., 2] == want).all(), got[..., 0]
    # a mode-I picture holding 8-bit values stays as it is; one with 16-bit values is scaled
    assert np.asarray(to_8bit(Image.fromarray(np.array([[3, 250]], dtype=np.int32)))).tolist() == [[3, 250]]
    assert np.asarray(to_8bit(Image.fromarray(np.array([[3, 65535]], dtype=np.int32)))).tolist() == [[0, 255]]


def test_sample_init_reads_16bit_as_train_data_does(tmp_path):
    """sample.py --init and the training data share the reader: the same pixels."""
    from minisd.train.data import open_rgb
    a = (np.arange(120, dtype=np.uint32).reshape(10, 12) * 547).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "g.png")
    path = str(tmp_path / "g.png")
    assert np.array_equal(np.asarray(open_rgb(path)), np.asarray(read_image(path)))


def test_reader_refuses_what_must_not_be_opened(tmp_path):
    os.mkfifo(tmp_path / "fifo.png")
    signal.alarm(10)  # an open() of the FIFO would block forever: fail instead
    try:
        with pytest.raises(ValueError, match="not a regular file"):
            read_image(str(tmp_path / "fifo.png"))
        with pytest.raises(ValueError, match="not a regular file"):
            read_text_file(str(tmp_path / "fifo.png"))
    finally:
        signal.alarm(0)
    with pytest.raises(ValueError, match="folder"):
        read_image(str(tmp_path))
    with pytest.raises(ValueError, match="missing"):
        read_image(str(tmp_path / "nope.png"))
    Image.new("RGB", (30, 20)).save(tmp_path / "big.png")
    with pytest.raises(ValueError, match="30x20 pixels"):  # 600 > 599: refused from the header
        read_image(str(tmp_path / "big.png"), max_pixels=599)
    assert read_image(str(tmp_path / "big.png"), max_pixels=600).size == (30, 20)
    Image.new("RGB", (1, 1)).save(tmp_path / "one.png")
    with pytest.raises(ValueError, match="too small"):
        read_image(str(tmp_path / "one.png"), min_side=8)
    (tmp_path / "bad.txt").write_bytes(b"ok\xff")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_text_file(str(tmp_path / "bad.txt"))


def test_transparent_pixels_composite_on_white(tmp_path):
    """alpha a over white: c·a/255 + 255·(1 − a/255); (200, 0, 0, 51): 200·0.2 + 255·0.8 = 244, 0 + 204 = 204."""
    Image.new("RGBA", (9, 9), (200, 0, 0, 51)).save(tmp_path / "a.png")
    assert np.asarray(read_image(str(tmp_path / "a.png")))[0, 0].tolist() == [244, 204, 204]


# ----------------------------------------------------------------------------------------------- numbers
def test_number_refuses_nan_inf_bools_and_ranges():
    assert number("--cfg", 7.5, lo=0) == 7.5 and number("--eta", 0, lo=0, hi=1) == 0
    for bad, pattern in ((math.nan, "finite"), (math.inf, "finite"), (-math.inf, "finite"), (-0.1, ">= 0"),
                         (True, "a number"), ("3", "a number"), ([1], "a number")):
        with pytest.raises(ValueError, match=pattern):
            number("--cfg", bad, lo=0)
    with pytest.raises(ValueError, match=r"within \[0, 1\]"):
        number("--eta", 1.5, lo=0, hi=1)
    with pytest.raises(ValueError, match="> 0"):
        number("--lr", 0.0, lo=0, lo_open=True)
    with pytest.raises(ValueError, match="whole number"):
        number("--steps", 2.0, integer=True)


def test_device_and_size_checks():
    assert check_device("cpu") == "cpu"
    for bad in ("foo", "cuda:99" if torch.cuda.is_available() else "cuda", "xla"):
        with pytest.raises(ValueError, match="--device"):
            check_device(bad)
    check_size(64, 32, 8, SD15.vae, 1, "cpu")
    for w, h, pattern in ((0, 64, "positive"), (64, -8, "positive"), (60, 64, "multiple of 8")):
        with pytest.raises(ValueError, match=pattern):
            check_size(w, h, 8, SD15.vae, 1, "cpu")
    # 10^5 x 10^5 px with SD's VAE: 1e10 px x 4 bytes x (3·128 + 256) channels = 2.56e13 bytes
    # = 2.56e13 / 2^30 = 23841.86 GiB
    with pytest.raises(ValueError, match=r"needs at least 23841\.9 GiB"):
        check_size(100000, 100000, 8, SD15.vae, 1, "cpu")


# ----------------------------------------------------------------------------------------------- files
def test_read_json_one_line_for_every_failure(tmp_path):
    cases = {"deep": "[" * 100000 + "]" * 100000, "list": "[1, 2]", "broken": '{"a": ', "binary": b"\xff\xfe{}"}
    for name, text in cases.items():
        p = tmp_path / name
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(ValueError, match=name) as e:
            read_json(str(p), "config")
        assert "\n" not in str(e.value)
    (tmp_path / "ok").write_text('{"a": 1}')
    assert read_json(str(tmp_path / "ok")) == {"a": 1}


def test_model_config_fields_are_checked():
    for preset in (SD15, TINY):
        check_config(preset)
    good = TINY.to_dict()

    def edited(path, value):
        d = json.loads(json.dumps(good))
        node = d
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        return d
    cases = [(("unet", "model_channels"), True, "unet.model_channels"), (("unet", "channel_mult"), [1, "2"],
             "unet.channel_mult"), (("vae", "scale_factor"), -0.1, "vae.scale_factor"),
             (("vae", "scale_factor"), {"x": 1}, "vae.scale_factor"), (("unet", "context_dim"), 2**40, "context_dim"),
             (("schedule", "beta_schedule"), "cosine", "beta_schedule"), (("family",), "sd9", "family"),
             (("text_encoders", 0, "hidden_act"), "relu", "hidden_act"), (("unet",), [1], "unet must be an object"),
             (("unet", "transformer_depth"), [1], "one entry per level"), (("resolution",), 0, "resolution")]
    for path, value, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            ModelConfig.from_dict(edited(path, value))


def test_scheduler_keys_refused_where_sampling_would_ignore_them():
    scheduler_keys({"_class_name": "DDIMScheduler", "clip_sample": False, "beta_start": 0.00085,
                    "_use_default_values": ["x"], "lambda_min_clipped": -math.inf}, "s")
    for d, pattern in (({"clip_sample": True}, "clip_sample"), ({"rescale_betas_zero_snr": True}, "rescale"),
                       ({"use_karras_sigmas": True}, "--karras"), ({"trained_betas": [0.1]}, "trained_betas"),
                       ({"made_up": 1}, "unknown scheduler key 'made_up'")):
        with pytest.raises(ValueError, match=pattern):
            scheduler_keys(d, "s")


def test_train_values_typed_and_finite(tmp_path):
    from minisd.train.cli import parse_config
    for text, pattern in (("max_steps = true\n", "max_steps must be a whole number"),
                          ('lr = "1e-3"\n', "lr must be a number"), ("lr = nan\n", "finite"),
                          ("rank = [8]\n", "a list"), ("[seed]\na = 1\n", "a table"),
                          ('model = "a\\u0000b"\n', "NUL")):
        (tmp_path / "c.toml").write_text(text)
        with pytest.raises(ValueError, match=pattern):
            parse_config(["--config", str(tmp_path / "c.toml")])
    for argv, pattern in ((["--lr", "nan"], "--lr must be a finite"), (["--warmup-steps", "-1"], "--warmup-steps"),
                          (["--max-grad-norm", "-0.5"], "--max-grad-norm"), (["--device", "gpu"], "--device")):
        with pytest.raises(ValueError, match=pattern):
            parse_config(argv)
    cfg, _ = parse_config(["--max-grad-norm", "0", "--warmup-steps", "0", "--min-snr-gamma", "5"])
    assert (cfg.max_grad_norm, cfg.warmup_steps, cfg.min_snr_gamma) == (0.0, 0, 5.0)


# ----------------------------------------------------------------------------------------------- grids, paths
def test_ddim_grid_never_reaches_t_1000():
    """leading spacing with steps_offset 1: t = k·(1000 // n) + 1. n = 1000: k = 999 gives t = 1000 (refused);
    n = 999: 1000 // 999 = 1, t_max = 998 + 1 = 999 (the last index of the table)."""
    from minisd.samplers import make_sampler
    assert int(make_sampler("ddim", SD15.schedule, 999).timesteps[0]) == 999
    with pytest.raises(ValueError, match="at most 999 steps"):
        make_sampler("ddim", SD15.schedule, 1000)
    assert len(make_sampler("euler", SD15.schedule, 1000).timesteps) == 1000  # linspace stays inside


def test_metadata_names_stay_inside_the_folder(tmp_path):
    from minisd.train.data import DataError, scan
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    for name in ("../x.png", "../../x.png", "/etc/passwd", "sub/../../x.png", ""):
        (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": name, "text": "t"}) + "\n")
        with pytest.raises(DataError, match="not a path inside"):
            scan(str(tmp_path))
    for row in ({"file_name": 3}, {"file_name": "a.png", "text": ["x"]}, [1]):
        (tmp_path / "metadata.jsonl").write_text(json.dumps(row) + "\n")
        with pytest.raises(DataError, match="expected"):
            scan(str(tmp_path))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "./a.png", "text": "t"}) + "\n")
    assert [e.path for e in scan(str(tmp_path)).examples] == [os.path.join(str(tmp_path), "a.png")]


def test_non_finite_decode_is_refused_not_saved_black():
    from minisd.model import StableDiffusion
    from minisd.pipeline import Pipeline
    torch.manual_seed(0)
    model = StableDiffusion(TINY)
    pipe = Pipeline(model, device="cpu")
    latents = torch.zeros(1, TINY.unet.in_channels, 4, 4)
    assert len(pipe.decode(latents)) == 1
    with torch.no_grad():
        next(model.vae.decoder.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        pipe.decode(latents)


def test_fifo_in_a_data_folder_is_skipped_not_opened(tmp_path):
    """A FIFO named like an image inside --data: listed as skipped, never opened (an open would block)."""
    from minisd.train.data import CaptionDataset
    Image.new("RGB", (16, 16), (9, 9, 9)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a grey square")
    os.mkfifo(tmp_path / "b.png")
    signal.alarm(20)
    try:
        ds = CaptionDataset(str(tmp_path), resolution=16)
    finally:
        signal.alarm(0)
    assert [os.path.basename(e.path) for e in ds.examples] == ["a.png"]
    assert ds.skipped == [("b.png", "not a regular file (a FIFO)")]
