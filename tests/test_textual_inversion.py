"""train.py --method ti (issue 17): only the new token's vectors train (every other tensor, the rest of the embedding
table included, bit-for-bit as loaded), their gradient is the one a trainable table would give those rows, the norm
regulariser equals its formula by hand, the A1111 and diffusers files load back through sample.py's reader and draw
the in-memory model's image, resume is exact, SDXL trains one set per encoder, LDM-256 is refused with one line."""
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sample  # noqa: E402
import train  # noqa: E402
from minisd import world  # noqa: E402
from minisd.adapters.embeddings import load_embedding, read_embedding  # noqa: E402
from minisd.formats import load_model  # noqa: E402
from minisd.pipeline import Pipeline  # noqa: E402
from minisd.train.cli import parse_config  # noqa: E402
from minisd.train.loop import Trainer  # noqa: E402
from minisd.train.textual_inversion import TextualInversion  # noqa: E402
from minisd.trainer import Draws, training_loss  # noqa: E402
from conftest import killed_and_resumed, save_tiny_sdxl  # noqa: E402

torch.set_num_threads(1)
FAST = ["--model", "tiny-random", "--threads", "1", "--no-progress", "--batch-size", "2", "--no-samples",
        "--method", "ti"]
PROMPT = "a small <sks> emblem at the top left on a blue background"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return world.write_folder(str(tmp_path_factory.mktemp("subject")), 4, seed=0, subject=True, token="<sks>")


def trainer(tmp_path, data_dir, *flags, model="tiny-random"):
    cfg, _ = parse_config(FAST + ["--data", data_dir, "--out", str(tmp_path), "--model", model] + list(flags))
    return Trainer(cfg, str(tmp_path), log=lambda s: None)


def test_only_the_new_rows_change(tmp_path, data_dir):
    base = load_model("tiny-random")
    t = trainer(tmp_path, data_dir, "--lr", "0.05", "--max-steps", "3", "--ti-vectors", "2", "--ti-init",
                "red circle", "--weight-decay", "0.5", "--save-every", "0")
    m = t.model
    assert [p for p in m.parameters() if p.requires_grad] == []                  # the model itself is frozen
    assert [p for g in t.opt.param_groups for p in g["params"]] == t.method.params  # the optimizer sees the vectors
    tok, te = m.tokenizers[0], m.text_encoders[0]
    ids = t.method.ids[0]
    V = base.text_encoders[0].text_model.embeddings.token_embedding.weight.shape[0]
    assert ids == [V, V + 1]
    # the init: "red circle" is two tokens spread over the two vectors (A1111's rule)
    init_ids = tok.prompt_tokens("red circle")
    table0 = base.text_encoders[0].text_model.embeddings.token_embedding.weight
    assert torch.equal(t.method.params[0].detach(), table0[init_ids])
    t.run()
    table = te.text_model.embeddings.token_embedding.weight
    assert table.shape[0] == V + 2
    assert torch.equal(table[:V], table0)                                         # every old row, bit for bit
    assert torch.equal(table[V:], t.method.params[0].detach())                    # the new rows hold the vectors
    assert not torch.equal(table[V:], table0[init_ids])                           # and they moved
    sd0, sd1 = base.state_dict(), m.state_dict()
    emb = "text_encoders.0.text_model.embeddings.token_embedding.weight"
    assert set(sd0) == set(sd1)
    for k in sd0:
        if k != emb:
            assert torch.equal(sd0[k], sd1[k]), k


def test_gradient_is_a_trainable_tables_on_the_new_rows(tmp_path, data_dir):
    """The hook's splice is exact: the vectors' gradient equals the gradient that the rows of a trainable table get
    (same step, same draws), and a plain table lookup gives the same loss."""
    t = trainer(tmp_path, data_dir, "--ti-vectors", "2")
    batch = t.loader.next_batch()
    mb = t.micro_batch(batch)
    assert any(((ids >= t.method.ids[0][0]).any()) for ids in mb.ids)            # the captions use the token
    state = t.gen.get_state()
    loss = training_loss(t.model, t.noise, mb, Draws(t.gen), train_text_encoder=True)
    loss.backward()
    g_vec = t.method.params[0].grad.clone()
    assert g_vec.abs().sum() > 0
    # reference: no hook, the table's rows set to the vectors and trainable
    for h in t.method.handles:
        h.remove()
    t.method.write_into_table()
    table = t.model.text_encoders[0].text_model.embeddings.token_embedding.weight
    table.requires_grad_(True)
    t.gen.set_state(state)
    loss2 = training_loss(t.model, t.noise, mb, Draws(t.gen), train_text_encoder=True)
    loss2.backward()
    assert torch.equal(loss, loss2)
    ids = t.method.ids[0]
    torch.testing.assert_close(table.grad[ids], g_vec, rtol=0, atol=1e-9)
    print("max |grad| difference", (table.grad[ids] - g_vec).abs().max().item())


def test_norm_regulariser_by_hand(data_dir):
    m = load_model("tiny-random")
    table = m.text_encoders[0].text_model.embeddings.token_embedding.weight.detach().double().numpy().copy()
    ti = TextualInversion(m, "<sks>", n_vectors=3, init="circle", norm_weight=0.2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        ti.params[0].copy_(torch.randn(ti.params[0].shape, generator=g) * 0.7)
    v = ti.params[0].detach().double().numpy()
    mu = np.mean([np.sqrt(np.sum(row ** 2)) for row in table])                  # the vocabulary's mean norm
    norms = [np.sqrt(np.sum(r ** 2)) for r in v]
    expected = 0.2 * sum((n - mu) ** 2 for n in norms) / 3
    got = ti.regulariser()
    print(f"R by hand {expected:.8f}, minisd {got.item():.8f}")
    assert abs(got.item() - expected) < 1e-6 * max(1.0, expected)
    got.backward()  # its gradient reaches the vectors
    assert ti.params[0].grad.abs().sum() > 0
    assert TextualInversion(load_model("tiny-random"), "<sks>", norm_weight=0.0).regulariser() == 0.0


def test_regulariser_enters_the_loss(tmp_path, data_dir):
    """The step's loss is the diffusion loss plus R (same draws with and without --ti-norm-weight)."""
    a = trainer(tmp_path / "a", data_dir, "--ti-norm-weight", "3.0")
    b = trainer(tmp_path / "b", data_dir)
    batch = a.loader.next_batch()
    la = a.micro_loss(batch)
    lb = b.micro_loss(b.loader.next_batch())
    torch.testing.assert_close(la - lb, a.method.regulariser(), rtol=1e-5, atol=1e-6)
    assert a.method.regulariser().item() > 0


def test_files_load_back_and_draw_the_same_image(tmp_path, data_dir):
    run = tmp_path / "run"
    t = trainer(run, data_dir, "--lr", "0.05", "--max-steps", "2", "--ti-vectors", "2")
    out = t.run()
    assert {"embedding", "learned_embeds"} <= set(out)
    a1111, diffusers = read_embedding(out["embedding"]), read_embedding(out["learned_embeds"])
    assert torch.equal(a1111[""], t.method.params[0].detach()) and torch.equal(diffusers[""], a1111[""])
    kw = dict(steps=3, cfg_scale=3.0, seed=5, width=64, height=64)
    ref = np.asarray(Pipeline(t.model.eval(), dtype=torch.float32)(PROMPT, **kw)[0])
    m2 = load_model("tiny-random")
    assert load_embedding(m2, out["learned_embeds"], "<sks>") == ("<sks>", 2)
    img = np.asarray(Pipeline(m2, dtype=torch.float32)(PROMPT, **kw)[0])
    assert np.array_equal(ref, img)
    # sample.py --embedding FILE:TOKEN, the A1111 file
    png = str(tmp_path / "s.png")
    assert sample.main([PROMPT, "--model", "tiny-random", "--embedding", f"{out['embedding']}:<sks>", "--steps", "3",
                        "--cfg", "3", "--seed", "5", "--width", "64", "--height", "64", "--out", png]) == 0
    assert np.array_equal(ref, np.asarray(Image.open(png).convert("RGB")))
    # and the token matters: without the embedding's vectors the image differs
    plain = np.asarray(Pipeline(load_model("tiny-random"), dtype=torch.float32)(PROMPT.replace("<sks>", "red"),
                                                                                **kw)[0])
    assert not np.array_equal(ref, plain)


def test_resume_is_exact(tmp_path, data_dir):
    flags = ("--lr", "0.02", "--max-steps", "4", "--save-every", "2", "--ti-norm-weight", "0.1")
    full, losses, again, resumed = killed_and_resumed(lambda name: trainer(tmp_path / name, data_dir, *flags))
    assert resumed == losses
    assert torch.equal(again.method.params[0], full.method.params[0])


def test_sdxl_trains_both_encoders(tmp_path, data_dir):
    model = save_tiny_sdxl(tmp_path / "sdxl")
    t = trainer(tmp_path / "run", data_dir, "--lr", "0.05", "--max-steps", "2", "--resolution", "32", model=model)
    before = [p.detach().clone() for p in t.method.params]
    out = t.run()
    assert len(t.method.params) == 2 and all(not torch.equal(a, b) for a, b in zip(before, t.method.params))
    vecs = read_embedding(out["embedding"])
    assert set(vecs) == {"clip_l", "clip_g"}
    assert torch.equal(vecs["clip_l"], t.method.params[0].detach()) and torch.equal(vecs["clip_g"],
                                                                                    t.method.params[1].detach())
    assert "learned_embeds_2" in out and torch.equal(read_embedding(out["learned_embeds_2"])[""], vecs["clip_g"])
    kw = dict(steps=2, cfg_scale=3.0, seed=1, width=32, height=32)
    ref = np.asarray(Pipeline(t.model.eval(), dtype=torch.float32)(PROMPT, **kw)[0])
    m2 = load_model(model)
    load_embedding(m2, out["embedding"], "<sks>")
    assert np.array_equal(ref, np.asarray(Pipeline(m2, dtype=torch.float32)(PROMPT, **kw)[0]))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err, err
    return err


def test_bad_flags_are_one_line(tmp_path, data_dir, capsys):
    base = FAST + ["--data", data_dir, "--max-steps", "1"]
    cases = [(["--rank", "4"], "--rank applies to --method lora"),
             (["--ti-token", "a b"], "--ti-token must be one word"),
             (["--ti-vectors", "0"], "--ti-vectors must be >= 1"),
             (["--ti-norm-weight", "-1"], "--ti-norm-weight must be >= 0"),
             (["--cache-text"], "--cache-text cannot be used with --method ti"),
             (["--ti-token", "<|endoftext|>"], "already in the vocabulary")]
    for i, (flags, message) in enumerate(cases):
        assert train.main(base + ["--out", str(tmp_path / str(i))] + flags) == 2, flags
        assert message in one_line_error(capsys), flags
    # a TI flag without --method ti
    assert train.main([a for a in base if a not in ("--method", "ti")] + ["--ti-vectors", "2"]) == 2
    assert "--ti-vectors applies to --method ti, not --method lora" in one_line_error(capsys)


def test_ldm_is_refused(tmp_path, data_dir, capsys):
    from minisd.config import LDM_256, TINY, LDMBertConfig, ModelConfig, UNetConfig
    from minisd.model import StableDiffusion, save_model
    cfg = ModelConfig(family="ldm", unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=(1, 1),
                                                    transformer_depth=(1, 1), num_heads=4, context_dim=32,
                                                    norm_num_groups=8),
                      vae=TINY.vae, text_encoders=[LDMBertConfig(n_layer=2, d_model=32, n_heads=4, head_dim=8,
                                                                 ffn_dim=64)],
                      schedule=LDM_256.schedule, resolution=64)
    save_model(StableDiffusion(cfg), str(tmp_path / "ldm"))
    assert train.main(FAST + ["--data", data_dir, "--model", str(tmp_path / "ldm"), "--out", str(tmp_path / "r"),
                              "--max-steps", "1"]) == 2
    assert "needs CLIP text encoders" in one_line_error(capsys)


def test_sd2_openclip(tmp_path, data_dir):
    """SD2's OpenCLIP tower (gelu, '!' padding, linear projections in the UNet): the same vectors-only training and
    an A1111 file that draws the in-memory image."""
    import dataclasses
    from minisd.config import TINY, CLIPTextConfig
    from minisd.model import StableDiffusion, save_model
    cfg = dataclasses.replace(TINY, family="sd2", unet=dataclasses.replace(TINY.unet, use_linear_in_transformer=True),
                              text_encoders=[CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                                            num_hidden_layers=2, hidden_act="gelu", pad_token="!")])
    torch.manual_seed(0)
    save_model(StableDiffusion(cfg), str(tmp_path / "sd2"))
    t = trainer(tmp_path / "run", data_dir, "--lr", "0.05", "--max-steps", "2", "--ti-vectors", "3",
                model=str(tmp_path / "sd2"))
    out = t.run()
    assert read_embedding(out["embedding"])[""].shape == (3, 32)
    kw = dict(steps=2, cfg_scale=3.0, seed=4, width=64, height=64)
    ref = np.asarray(Pipeline(t.model.eval(), dtype=torch.float32)(PROMPT, **kw)[0])
    m2 = load_model(str(tmp_path / "sd2"))
    load_embedding(m2, out["embedding"], "<sks>")
    assert np.array_equal(ref, np.asarray(Pipeline(m2, dtype=torch.float32)(PROMPT, **kw)[0]))


def test_cli_world_run(tmp_path, capsys):
    """`train.py --method ti` without --data: the world's subject captioned with the token, scored before / after."""
    out = str(tmp_path / "run")
    flags = [a for a in FAST if a != "--no-samples"]
    assert train.main(flags + ["--max-steps", "2", "--n-images", "4", "--out", out, "--n-eval", "2",
                               "--sample-steps", "2", "--ti-token", "<zq>"]) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "captioned '<zq> emblem'" in text and "probe after: subject" in text
    assert open(os.path.join(out, "data", "00000.txt")).read().count("<zq> emblem") == 1
    for f in ("embedding.safetensors", "learned_embeds.safetensors", "probe_after.json", "loss.png"):
        assert os.path.isfile(os.path.join(out, f)), f
    assert not os.path.exists(os.path.join(out, "lora.safetensors"))
