"""The GPU benchmark harness (bench/) smoke-tested on the CPU with tiny models of both implementations: a training
case with checkpointing, an SDXL sampling case and the optimizer case run in-process and write complete results;
bitsandbytes' row is recorded as skipped (not a test skip) where it is not installed; a failing case becomes an
"error" result; report.py renders the tables with the minisd / reference ratio; run.py runs a case in a subprocess and
skips it the second time."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

from bench import case as bench_case
from bench import report
from bench.cases import BY_NAME, CASES, select

CPU = torch.device("cpu")
COMMON = ["case", "impl", "status", "error", "step_ms", "images_per_s", "steps_per_s", "peak_alloc_gib",
          "peak_reserved_gib", "flops_per_step", "mfu", "versions", "device", "command", "options", "info", "date"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Run the three smoke cases once (warmup 0, one timed iteration) and keep their records."""
    out = str(tmp_path_factory.mktemp("bench"))
    torch.set_num_threads(1)
    recs = {}
    for name, impls in [("sd15-lora-512-bs4-gc", ("minisd", "diffusers")),
                        ("sample-sdxl-1024", ("minisd", "diffusers")),
                        ("optim-sd15", ("minisd", "bnb", "torch"))]:
        for impl in impls:
            rec = bench_case.run_case(BY_NAME[name], impl, CPU, tiny=True, warmup=0, iters=1,
                                      command=f"python bench/case.py {name} --impl {impl} --tiny")
            bench_case.write_json(rec, out)
            recs[(name, impl)] = rec
    return out, recs


def test_case_table_is_consistent():
    assert len({c.name for c in CASES}) == len(CASES)
    assert {c.kind for c in CASES} == {"train", "sample", "optim"}
    assert all(c.versus in BY_NAME for c in CASES if c.versus)
    assert [c.name for c in select(["sd15-lora-512-bs8*"])] == ["sd15-lora-512-bs8", "sd15-lora-512-bs8-gc",
                                                                 "sd15-lora-512-bs8-cached",
                                                                 "sd15-lora-512-bs8-gc-cached"]
    assert all(c.targets for c in select(["@targets"]))


def test_train_case_records_everything(results):
    _, recs = results
    a, b = recs[("sd15-lora-512-bs4-gc", "minisd")], recs[("sd15-lora-512-bs4-gc", "diffusers")]
    for r in (a, b):
        assert r["status"] == "ok", r["error"]
        assert all(k in r for k in COMMON)
        assert r["step_ms"] > 0 and r["images_per_s"] == pytest.approx(2 * 1e3 / r["step_ms"])  # tiny: batch 2
        assert r["flops_per_step"] > 0 and r["mfu"] is None and r["peak_alloc_gib"] is None    # CPU
        assert r["versions"]["torch"] and r["versions"]["diffusers"]
        assert r["checkpointing"] and r["info"]["dtypes"]["unet"] == "bfloat16"
    # the same adapter on the same network on both sides
    assert a["info"]["trainable_params"] == b["info"]["trainable_params"] > 0
    assert a["info"]["unet_params"] == b["info"]["unet_params"]
    assert a["info"]["vae_params"] == b["info"]["vae_params"] and a["info"]["text_params"] == b["info"]["text_params"]


def test_sample_case_times_each_phase(results):
    _, recs = results
    for impl in ("minisd", "diffusers"):
        r = recs[("sample-sdxl-1024", impl)]
        assert r["status"] == "ok", r["error"]
        assert r["loop_ms"] > 0 and r["text_ms"] > 0 and r["decode_ms"] > 0
        assert r["unet_it_s"] == pytest.approx(r["info"]["steps"] * 1e3 / r["loop_ms"])
        assert r["step_ms"] >= r["loop_ms"]
    # the same work is counted on both sides (attention has no FLOP formula on the CPU, so allow a little)
    f = [recs[("sample-sdxl-1024", i)]["flops_per_step"] for i in ("minisd", "diffusers")]
    assert f[0] == pytest.approx(f[1], rel=0.1)


def test_optimizer_case_and_bitsandbytes_row(results):
    _, recs = results
    m, t, b = (recs[("optim-sd15", i)] for i in ("minisd", "torch", "bnb"))
    assert m["status"] == t["status"] == "ok"
    # 8-bit codes + block scales (~2.03 B) plus fp32 state of the tiny model's many small tensors, vs fp32 m and v
    assert 2.0 < m["state_bytes_per_param"] < 2.6 and t["state_bytes_per_param"] == pytest.approx(8.0, abs=0.01)
    try:
        import bitsandbytes  # noqa: F401
        installed = True
    except ImportError:
        installed = False
    if installed:
        assert b["status"] in ("ok", "error")   # bitsandbytes may have no CPU kernels
    else:
        assert b["status"] == "skipped" and b["error"] == "bitsandbytes not installed" and b["step_ms"] is None
        assert b["versions"]["bitsandbytes"] is None and b["versions"]["torch"]


def test_failure_is_recorded(monkeypatch):
    def broken(*a, **kw):
        raise RuntimeError("boom")
    monkeypatch.setattr(bench_case, "build_workload", broken)
    rec = bench_case.run_case(BY_NAME["optim-sd15"], "torch", CPU, tiny=True)
    assert rec["status"] == "error" and rec["error"] == "RuntimeError: boom" and rec["step_ms"] is None


def test_report_renders(results):
    out, recs = results
    text = report.render(out)
    assert "--tiny smoke-test numbers" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| sd15-lora-512-bs4-gc | minisd |")]
    assert len(rows) == 1
    q = recs[("sd15-lora-512-bs4-gc", "minisd")]["images_per_s"] / recs[("sd15-lora-512-bs4-gc", "diffusers")][
        "images_per_s"]
    assert f"{q:.2f}×" in rows[0]
    opt = [ln for ln in text.splitlines() if ln.startswith("| optim-sd15 | minisd |")][0]
    assert "state_bytes_per_param ≤ 2.1" in opt
    assert any(ln.startswith("| sample-sdxl-1024 | diffusers |") for ln in text.splitlines())


def test_run_py_subprocess_and_skip(tmp_path):
    out = str(tmp_path / "r")
    cmd = [sys.executable, "bench/run.py", "--cases", "optim-sd15", "--impl", "torch", "--tiny", "--device", "cpu",
           "--out", out, "--args", "--warmup 0 --iters 1"]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    rec = json.load(open(os.path.join(out, "optim-sd15.torch.json")))
    assert rec["status"] == "ok" and rec["command"].startswith("PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
    assert os.path.isfile(os.path.join(out, "optim-sd15.torch.log"))
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "0 run(s)" in second.stdout
    assert len(json.load(open(os.path.join(out, "run.json")))) == 2


# ---------------------------------------------------------------------------------------------- issue 20's rows
def _fake(out, case, impl, **kw):
    c = BY_NAME[case]
    rec = {"case": case, "impl": impl, "status": "ok", "error": None, "kind": c.kind, "group": c.group,
           "options": {}, "date": "2026-12-06T00:00:00+00:00", **kw}
    bench_case.write_json(rec, out)


def test_report_ratio_per_reference_and_versus(tmp_path):
    """One ratio column per reference (plain and compiled diffusers), each target read against its own; a minisd-only
    student row divided by the teacher's row."""
    out = str(tmp_path)
    _fake(out, "sd15-lora-512-bs8", "minisd", images_per_s=10.0, mfu=0.25)
    _fake(out, "sd15-lora-512-bs8", "diffusers", images_per_s=4.0)
    _fake(out, "sd15-lora-512-bs8", "diffusers-compiled", images_per_s=8.0)
    _fake(out, "sd15-distill-small-512-bs1", "minisd", images_per_s=3.0)
    _fake(out, "sd15-distill-teacher-512-bs1", "minisd", images_per_s=2.0)
    text = report.render(out)
    head = [ln for ln in text.splitlines() if ln.startswith("| case | impl | step ms | images/s")][0]
    assert "ratio vs diffusers (images/s) | ratio vs diffusers-compiled (images/s)" in head
    row = [ln for ln in text.splitlines() if ln.startswith("| sd15-lora-512-bs8 | minisd |")][0]
    assert "| 2.50× | 1.25× |" in row
    assert "≥ 2.5× diffusers images_per_s; ≥ 1.5× diffusers-compiled images_per_s; mfu ≥ 0.4 | yes; **no**; **no** |" \
        in row
    student = [ln for ln in text.splitlines() if ln.startswith("| sd15-distill-small-512-bs1 | minisd |")][0]
    assert "1.50× sd15-distill-teacher-512-bs1" in student


def test_compiled_reference_row_traces_fullgraph(tmp_path):
    """The fair rival on the tiny SD1.5 bs8 case, dynamo tracing the whole UNet (fullgraph) with the eager backend."""
    from bench.harness import Options
    rec = bench_case.run_case(BY_NAME["sd15-lora-512-bs8"], "diffusers-compiled", CPU, tiny=True, warmup=0, iters=1,
                              opts=Options(compile_backend="eager"))
    assert rec["status"] == "ok", rec["error"]
    recipe = rec["info"]["reference_recipe"]
    assert recipe["fullgraph"] and recipe["channels_last"] and recipe["vae_encoder_compiled"]
    assert rec["flops_per_step"] > 0


@pytest.mark.parametrize("name,impl,check", [
    ("sdxl-lora-1024-bs1-gc-int8", "minisd", lambda r: r["info"]["base_dtype"] == "int8"),
    ("sd15-full-512-bs1-gc-fused", "minisd", lambda r: r["info"]["fused_backward"] and r["info"]["dtypes"]["trainable"]
     == "float32"),
    ("sd15-hypernetwork-512-bs1", "minisd", lambda r: r["info"]["hooked_attention_layers"] > 0),
    ("sd15-distill-tiny-512-bs1", "minisd", lambda r: 0 < r["info"]["trainable_params"] < r["info"]["teacher_params"]),
])
def test_new_rows_run(name, impl, check):
    rec = bench_case.run_case(BY_NAME[name], impl, CPU, tiny=True, warmup=0, iters=1)
    assert rec["status"] == "ok", rec["error"]
    assert check(rec) and rec["flops_per_step"] > 0


def test_textual_inversion_steps_train_only_the_new_token():
    """minisd: only the spliced vector trains; diffusers: the table trains, every other row is written back."""
    from bench.harness import Options
    from bench.methods import DiffusersTI, MinisdTI
    case = BY_NAME["sd15-ti-512-bs1"]
    m = MinisdTI(case, "minisd", True, CPU, Options())
    before = [p.detach().clone() for p in m.params]
    m.step()
    assert all(p.shape == (1, b.shape[1]) and not torch.equal(p, b) for p, b in zip(m.params, before))
    assert (m.ids[:, 5] == m.new_id).all()
    d = DiffusersTI(case, "diffusers", True, CPU, Options())
    w, orig, keep = d.tables[0]
    d.step()
    assert torch.equal(w[keep], orig[keep]) and not torch.equal(w[d.new_id], orig[d.new_id])


def test_dreambooth_prior_doubles_the_batch():
    """Both sides see B instance + B class images per step and do the same counted work."""
    recs = [bench_case.run_case(BY_NAME["sd15-dreambooth-prior-512-bs1"], i, CPU, tiny=True, warmup=0, iters=1)
            for i in ("minisd", "diffusers")]
    for r in recs:
        assert r["status"] == "ok", r["error"]
        assert r["images_per_s"] == pytest.approx(2 * 1e3 / r["step_ms"]) and r["info"]["class_images_per_step"] == 1
    assert recs[0]["flops_per_step"] == pytest.approx(recs[1]["flops_per_step"], rel=1e-6)


def test_decode_dtype_bf16_both_sides(capsys):
    """--decode-dtype bfloat16 (sample.py --vae-dtype bf16): both sides decode in bf16 and record it; the decoded
    image is within bf16's rounding of the fp32 decode of the same latents (not equal: the flag takes effect);
    training rows refuse the flag with one line."""
    from bench.harness import Options
    from bench.sampling import MinisdSample
    case = BY_NAME["sample-sdxl-1024"]
    runs = {d: MinisdSample(case, "minisd", True, CPU, Options(decode_dtype=d)) for d in ("float32", "bfloat16")}
    assert next(runs["bfloat16"].parts.vae.parameters()).dtype == torch.bfloat16
    runs["bfloat16"].parts.vae.load_state_dict(runs["float32"].parts.vae.state_dict())  # same weights, rounded
    lat = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = (runs[d].decode(lat) for d in ("float32", "bfloat16"))
    assert b.dtype == torch.bfloat16 and a.dtype == torch.float32
    err = ((a - b.float()).norm() / a.norm()).item()
    assert 1e-4 < err < 2e-2, err   # bf16 operands: between 1e-3 and 1e-2 relative
    for impl in ("minisd", "diffusers"):
        r = bench_case.run_case(case, impl, CPU, tiny=True, warmup=0, iters=1, opts=Options(decode_dtype="bfloat16"))
        capsys.readouterr()  # transformers' import warnings
        assert r["status"] == "ok", r["error"]
        assert r["info"]["dtypes"]["vae"] == "bfloat16" and r["options"]["decode_dtype"] == "bfloat16"
    assert bench_case.main(["sd15-ti-512-bs1", "--impl", "minisd", "--tiny", "--device", "cpu", "--out", "/tmp",
                            "--decode-dtype", "bfloat16"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: --decode-dtype applies to the sampling cases only"]
