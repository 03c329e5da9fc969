"""sample.py --embedding (textual inversion) against diffusers' `load_textual_inversion`, A1111 long prompts (chunks of
75 tokens against transformers' CLIP run chunk by chunk), and --prompts FILE (each PNG reproduces alone)."""
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import save_file

import sample
from minisd.formats import load_model
from minisd.pipeline import Pipeline
from test_e2e import run_cli
from test_sample_lora import SAMPLE, assert_close, reference, sd1_pipe, sdxl_pipe

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd1p")
    sd1_pipe().save_pretrained(path)
    return str(path)


def draw(folder, tmp_path, prompt, *flags, name="ours.png"):
    out = tmp_path / name
    assert sample.main([prompt, "--model", folder, *SAMPLE, "--out", str(out), *flags]) == 0
    return np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)


def ref_image(pipe, prompt):
    return np.asarray(pipe(prompt, num_inference_steps=3, guidance_scale=5.0, height=32, width=32,
                           generator=torch.Generator().manual_seed(4)).images[0].convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("layout", ["a1111", "a1111_pt", "diffusers"])
def test_embedding_matches_diffusers(sd1, tmp_path, layout):
    g = torch.Generator().manual_seed(0)
    n = 1 if layout == "diffusers" else 3
    vec = torch.randn(n, 32, generator=g) * 0.5
    path = str(tmp_path / {"a1111": "mycat.safetensors", "a1111_pt": "mycat.pt",
                           "diffusers": "learned_embeds.safetensors"}[layout])
    if layout == "a1111":
        save_file({"emb_params": vec}, path)
    elif layout == "a1111_pt":
        torch.save({"string_to_param": {"*": vec}, "name": "mycat", "step": 100}, path)
    else:
        save_file({"mycat": vec[0]}, path)
    prompt = "a photo of mycat on a table"
    pipe = StableDiffusionPipeline.from_pretrained(sd1)
    pipe.load_textual_inversion(path, token="mycat")
    ref = ref_image(pipe, prompt)
    flag = path if layout != "diffusers" else f"{path}:mycat"
    assert_close(draw(sd1, tmp_path, prompt, "--embedding", flag), ref)
    # the tiny UNet hardly listens to text, so the embedding's effect is shown on the context, which must be
    # diffusers' exactly and far from the one without the embedding
    from minisd.adapters.embeddings import load_embedding
    model = load_model(sd1)
    base_ctx = Pipeline(model).encode_prompt([prompt])[0]
    load_embedding(model, path, "mycat")
    ctx = Pipeline(model).encode_prompt([prompt])[0]
    ref_ctx = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    assert (ctx - ref_ctx).abs().max() < 1e-5 and (ctx - base_ctx).abs().max() > 0.1


def test_sdxl_embedding_clip_l_clip_g_matches_diffusers(tmp_path):
    folder = str(tmp_path / "xl")
    sdxl_pipe().save_pretrained(folder)
    g = torch.Generator().manual_seed(1)
    vl, vg = torch.randn(2, 32, generator=g) * 0.5, torch.randn(2, 32, generator=g) * 0.5
    path = str(tmp_path / "shiny.safetensors")
    save_file({"clip_l": vl, "clip_g": vg}, path)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.load_textual_inversion(vl, token="shiny", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(vg, token="shiny", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    prompt = "a shiny circle"
    from minisd.adapters.embeddings import load_embedding
    model = load_model(folder)
    load_embedding(model, path)
    ctx, pooled = Pipeline(model).encode_prompt([prompt])
    ref_ctx, _, ref_pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    assert (ctx - ref_ctx).abs().max() < 1e-5, (ctx - ref_ctx).abs().max()
    # The pooled vector differs on purpose: the SDXL encoder-2 config says eos_token_id 2, for which transformers
    # reads the pooled state at the *largest* token id (its legacy rule), i.e. at an added TI token when the prompt
    # has one. minisd reads it at the end-of-text token, as OpenCLIP / A1111 do (their TI keeps the word's ids).
    # Reading transformers' hidden state at the EOS position gives minisd's value:
    te2 = pipe.text_encoder_2
    ids = pipe.tokenizer_2(pipe.maybe_convert_prompt(prompt, pipe.tokenizer_2), padding="max_length",
                           max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        last = te2(ids, output_hidden_states=True).last_hidden_state
        eos = (ids == 49407).int().argmax(-1)
        at_eos = te2.text_projection(last[torch.arange(1), eos])
    assert (pooled - at_eos).abs().max() < 1e-5 and (pooled - ref_pooled).abs().max() > 1e-3


LONG = " ".join(["red circle", "blue square", "green triangle"] * 30)  # 180 words, 180 tokens


def test_long_prompt_chunks_equal_transformers_chunk_by_chunk(sd1):
    """The A1111 rule written out with transformers: tokens in windows of 75, each wrapped BOS ... EOS, padded to 77,
    encoded alone by CLIPTextModel; hidden states concatenated."""
    from transformers import CLIPTextModel, CLIPTokenizer
    ref_te = CLIPTextModel.from_pretrained(sd1, subfolder="text_encoder").eval()
    tok = CLIPTokenizer.from_pretrained(sd1, subfolder="tokenizer")
    ids = tok(LONG, add_special_tokens=False).input_ids
    assert 150 < len(ids) <= 225  # three chunks
    chunks = []
    for c in range(0, len(ids), 75):
        row = [tok.bos_token_id] + ids[c:c + 75] + [tok.eos_token_id]
        row += [tok.pad_token_id] * (77 - len(row))
        chunks.append(ref_te(torch.tensor([row]))[0])
    ref = torch.cat(chunks, dim=1)
    pipe = Pipeline(load_model(sd1))
    ctx, _ = pipe.encode_prompt([LONG], pipe.n_chunks([LONG]))
    assert ctx.shape == ref.shape == (1, 231, 32)
    assert (ctx - ref).abs().max().item() < 1e-5
    # prompt and negative get the same number of chunks (padding-only chunks for the short one)
    both, _ = pipe.conditioning([LONG], ["blurry"], guidance=True)
    assert both.shape == (2, 231, 32)


def test_tokens_past_77_change_the_image(sd1, tmp_path):
    # guidance 40: the tiny random UNet hardly listens to text, guidance scales what it hears
    a = draw(sd1, tmp_path, LONG, "--cfg", "40", name="a.png")
    b = draw(sd1, tmp_path, LONG + " yellow star purple hexagon", "--cfg", "40", name="b.png")
    assert np.abs(a - b).max() > 2, np.abs(a - b).max()


def test_prompts_file_each_png_reproduces(sd1, tmp_path):
    lines = ["a red circle", "# a comment", "", "a blue square at the bottom"]
    (tmp_path / "p.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "batch.png"
    assert sample.main(["--prompts", str(tmp_path / "p.txt"), "--model", sd1, *SAMPLE, "--out", str(out)]) == 0
    for i, (prompt, seed) in enumerate([("a red circle", 4), ("a blue square at the bottom", 5)]):
        png = tmp_path / f"batch-{i}.png"
        text = Image.open(png).text["parameters"]
        assert text.splitlines()[0] == prompt and f"Seed: {seed}," in text
        flags = [f if f != "4" else str(seed) for f in SAMPLE]  # --seed from the PNG
        again = tmp_path / f"again-{i}.png"
        assert sample.main([prompt, "--model", sd1, *flags, "--out", str(again)]) == 0
        assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(again)))


def test_bad_embedding_is_one_line_error(sd1, tmp_path):
    save_file({"emb_params": torch.zeros(2, 48)}, str(tmp_path / "wide.safetensors"))
    save_file({"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(1, 32)}, str(tmp_path / "xl.safetensors"))
    for name, word in (("wide.safetensors", "width"), ("xl.safetensors", "SDXL")):
        r = run_cli("x", "--model", sd1, "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "n.png"),
                    "--embedding", str(tmp_path / name))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith("error:") and word in r.stderr, r.stderr
