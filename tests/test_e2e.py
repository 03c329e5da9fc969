"""End to end: tiny random diffusers pipelines saved to disk, then `sample.py` on the same folder with
the same seed, sampler and steps must give the same PNG: identical where measured identical on a 2-core x86 VM
(SD1 with every sampler, SD1 img2img, SD2, SDXL), at most 1/255 per pixel where a 1/255 step was measured (SD1
batch of 2, LDM, whose LDMBert differs from diffusers' by ~1e-6): a float difference far below 1/255 that moves a
pixel across a rounding boundary."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import BERT_VOCAB, CLIP_VOCAB, REFERENCE, ROOT, randomize

import diffusers
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LDMTextToImagePipeline,
                       StableDiffusionImg2ImgPipeline, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
from transformers import (BertTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                          CLIPTokenizer)

import sample

SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "euler": EulerDiscreteScheduler,
              "euler_a": EulerAncestralDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}
PROMPT = "a small red circle at the top left"


def scheduler_config(name: str) -> dict:
    with open(os.path.join(REFERENCE, "configs", name)) as f:
        return json.load(f)


def make_scheduler(kind: str, base: dict, karras: bool = False):
    extra = {"algorithm_type": "dpmsolver++", "solver_order": 2} if kind == "dpmpp_2m" else {}
    if karras:
        extra["use_karras_sigmas"] = True
    return SCHEDULERS[kind].from_config({**base, **extra})


def saved_scheduler_config(folder) -> dict:
    """The scheduler config exactly as minisd reads it from the saved folder."""
    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
        return json.load(f)


def clip_tokenizer(pad="<|endoftext|>"):
    return CLIPTokenizer(os.path.join(CLIP_VOCAB, "vocab.json"), os.path.join(CLIP_VOCAB, "merges.txt"),
                         pad_token=pad, model_max_length=77)


def tiny_unet(seed, **kw):
    args = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                attention_head_dim=4, norm_num_groups=8)
    args.update(kw)
    return randomize(UNet2DConditionModel(**args), seed, 0.05)


def tiny_vae(seed, levels=2):
    chans = (16, 32, 32, 32)[:levels]
    return randomize(AutoencoderKL(block_out_channels=chans, in_channels=3, out_channels=3,
                                   down_block_types=("DownEncoderBlock2D",) * levels,
                                   up_block_types=("UpDecoderBlock2D",) * levels, latent_channels=4,
                                   norm_num_groups=8, layers_per_block=1), seed, 0.05)


def tiny_clip(seed, hidden=32, act="quick_gelu", projection=False):
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_attention_heads=4, num_hidden_layers=2, hidden_act=act, projection_dim=hidden,
                         eos_token_id=2, bos_token_id=0, pad_token_id=1)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)
    return randomize(model, seed, 0.05)


def run_sample(args):
    assert sample.main(args) == 0


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def assert_same_image(ours_path, ref_img: Image.Image, tol: int = 0):
    ours, ref = pixels(ours_path), np.asarray(ref_img.convert("RGB"), dtype=np.int16)
    assert ours.shape == ref.shape
    diff = np.abs(ours - ref).max()
    assert ref.std() > 2.0, "reference image is flat: the test would prove nothing"
    assert diff <= tol, f"max pixel difference {diff}/255"


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_sd1")
    pipe = StableDiffusionPipeline(vae=tiny_vae(1), text_encoder=tiny_clip(2), tokenizer=clip_tokenizer(),
                                   unet=tiny_unet(3), scheduler=make_scheduler(
                                       "ddim", scheduler_config("sd15/scheduler_config.json")),
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


@pytest.mark.parametrize("sampler,karras", [("ddim", False), ("ddpm", False), ("euler", False),
                                            ("euler_a", False), ("dpmpp_2m", False), ("dpmpp_2m", True)])
def test_sd1_txt2img_matches_diffusers(sd1_folder, tmp_path, sampler, karras):
    pipe = StableDiffusionPipeline.from_pretrained(sd1_folder)
    pipe.scheduler = make_scheduler(sampler, saved_scheduler_config(sd1_folder), karras)
    ref = pipe(PROMPT, negative_prompt="blurry", num_inference_steps=5, guidance_scale=7.5,
               height=32, width=32, generator=torch.Generator().manual_seed(7)).images[0]
    out = tmp_path / "ours.png"
    run_sample([PROMPT, "--model", str(sd1_folder), "--steps", "5", "--sampler", sampler, "--cfg", "7.5",
                "--seed", "7", "--width", "32", "--height", "32", "--negative", "blurry", "--out", str(out),
                "--device", "cpu"] + (["--karras"] if karras else []))
    assert_same_image(out, ref)
    meta = Image.open(out).text["parameters"]
    assert meta.splitlines()[0] == PROMPT and "Negative prompt: blurry" in meta
    assert f"Seed: 7" in meta and "Size: 32x32" in meta


def test_sd1_batch_matches_diffusers(sd1_folder, tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(sd1_folder)
    pipe.scheduler = make_scheduler("euler_a", saved_scheduler_config(sd1_folder))
    refs = pipe(PROMPT, num_inference_steps=3, num_images_per_prompt=2, height=32, width=32,
                generator=torch.Generator().manual_seed(3)).images
    out = tmp_path / "b.png"
    run_sample([PROMPT, "--model", str(sd1_folder), "--steps", "3", "--sampler", "euler_a", "--seed", "3",
                "--width", "32", "--height", "32", "--batch", "2", "--out", str(out), "--device", "cpu"])
    for i, ref in enumerate(refs):
        assert_same_image(tmp_path / f"b-{i}.png", ref, tol=1)  # measured 1/255


def test_sd1_img2img_matches_diffusers(sd1_folder, tmp_path):
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    init_path = tmp_path / "init.png"
    init.save(init_path)
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(sd1_folder)
    pipe.scheduler = make_scheduler("ddim", saved_scheduler_config(sd1_folder))
    ref = pipe(PROMPT, image=init, strength=0.6, num_inference_steps=5, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(11)).images[0]
    out = tmp_path / "i2i.png"
    run_sample([PROMPT, "--model", str(sd1_folder), "--init", str(init_path), "--strength", "0.6",
                "--steps", "5", "--cfg", "5", "--seed", "11", "--out", str(out), "--device", "cpu"])
    assert_same_image(out, ref)


def test_sd2_v_prediction_matches_diffusers(tmp_path):
    cfg = scheduler_config("sd21_768v/scheduler_config.json")
    pipe = StableDiffusionPipeline(vae=tiny_vae(4), text_encoder=tiny_clip(5, act="gelu"),
                                   tokenizer=clip_tokenizer("!"),
                                   unet=tiny_unet(6, use_linear_projection=True, attention_head_dim=(2, 4)),
                                   scheduler=make_scheduler("euler", cfg), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "sd2")
    ref = pipe(PROMPT, num_inference_steps=4, height=32, width=32,
               generator=torch.Generator().manual_seed(5)).images[0]
    out = tmp_path / "sd2.png"
    run_sample([PROMPT, "--model", str(tmp_path / "sd2"), "--steps", "4", "--sampler", "euler",
                "--seed", "5", "--width", "32", "--height", "32", "--out", str(out), "--device", "cpu"])
    assert_same_image(out, ref)


def tiny_sdxl_pipeline():
    """The tiny SDXL pipeline (two text encoders, pooled + size conditioning, Euler) that every SDXL test shares."""
    unet = tiny_unet(7, block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                     attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=64,
                     addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=32 + 6 * 8)
    return StableDiffusionXLPipeline(vae=tiny_vae(8), text_encoder=tiny_clip(9),
                                      text_encoder_2=tiny_clip(10, act="gelu", projection=True),
                                      tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer("!"), unet=unet,
                                      scheduler=make_scheduler("euler",
                                                               scheduler_config("sdxl_base/scheduler_config.json")),
                                      force_zeros_for_empty_prompt=True, add_watermarker=False)


@pytest.mark.parametrize("negative", ["", "ugly"])
def test_sdxl_matches_diffusers(tmp_path, negative):
    pipe = tiny_sdxl_pipeline()
    pipe.save_pretrained(tmp_path / "xl")
    ref = pipe(PROMPT, negative_prompt=negative or None, num_inference_steps=4, height=32, width=32,
               guidance_scale=6.0, generator=torch.Generator().manual_seed(9)).images[0]
    out = tmp_path / "xl.png"
    run_sample([PROMPT, "--model", str(tmp_path / "xl"), "--steps", "4", "--sampler", "euler", "--cfg", "6",
                "--seed", "9", "--width", "32", "--height", "32", "--negative", negative, "--out", str(out),
                "--device", "cpu"])
    assert_same_image(out, ref)


def test_ldm_matches_diffusers(tmp_path):
    bert = randomize(LDMBertModel(LDMBertConfig(vocab_size=30522, max_position_embeddings=77, encoder_layers=2,
                                                encoder_ffn_dim=64, encoder_attention_heads=2, head_dim=8,
                                                d_model=32)), 11, 0.05)
    unet = tiny_unet(12, cross_attention_dim=32)
    sched = DDIMScheduler.from_config(scheduler_config("ldm_text2im_large_256/scheduler_config.derived.json"))
    pipe = LDMTextToImagePipeline(vqvae=tiny_vae(13, levels=4), bert=bert,
                                  tokenizer=BertTokenizer(os.path.join(BERT_VOCAB, "vocab.txt"), model_max_length=77), unet=unet,
                                  scheduler=sched)
    pipe.save_pretrained(tmp_path / "ldm")
    ref = pipe(PROMPT, num_inference_steps=5, guidance_scale=4.0, height=64, width=64,
               generator=torch.Generator().manual_seed(13)).images[0]
    out = tmp_path / "ldm.png"
    run_sample([PROMPT, "--model", str(tmp_path / "ldm"), "--steps", "5", "--sampler", "ddim", "--cfg", "4",
                "--seed", "13", "--width", "64", "--height", "64", "--out", str(out), "--device", "cpu"])
    assert_same_image(out, ref, tol=1)  # measured 1/255


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def test_sample_tiny_random_runs(tmp_path):
    out = tmp_path / "t.png"
    r = run_cli("a blue square", "--model", "tiny-random", "--steps", "2", "--out", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (64, 64)


@pytest.mark.parametrize("bad", ["missing", "empty_dir", "garbage_file"])
def test_sample_bad_model_is_one_line_error(tmp_path, bad):
    path = tmp_path / bad
    if bad == "empty_dir":
        path.mkdir()
    elif bad == "garbage_file":
        path.write_bytes(b"not a checkpoint")
    out = tmp_path / "never.png"
    r = run_cli("x", "--model", str(path), "--out", str(out), "--device", "cpu")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert str(path) in r.stderr
    assert not out.exists()


def test_sample_bad_flag_exits_2():
    r = run_cli("x", "--steps", "0")
    assert r.returncode == 2 and "Traceback" not in r.stderr
