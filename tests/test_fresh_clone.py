"""A fresh clone is whole: the tests read nothing outside the repository, the README's quick start says what it
needs (Python version, a virtual environment, the CPU torch wheel), CI runs the README's test command verbatim, and
train.py finds the embedded model from any working directory."""
import os
import re
import subprocess

import pytest

from conftest import REFERENCE, ROOT

# The reference files the tests open (manifests of the official checkpoints and their configs).
MANIFESTS = ["sd15_single_file.json", "sd15_diffusers.json", "sd21_768v_single_file.json", "sd21_768v_diffusers.json",
             "sd2_base_single_file.json", "sdxl_base_single_file.json", "sdxl_base_diffusers.json",
             "ldm_text2im_large_256_diffusers.json", "ldm_txt2img_f8_large_original.json"]
CONFIGS = ["sd15/scheduler_config.json", "sd15/unet.json", "sd15/vae.json", "sd15/text_encoder.json",
           "sd21_768v/unet.json", "sd21_base/unet.json", "sdxl_base/unet.json", "sdxl_base/text_encoder_2.json",
           "ldm_text2im_large_256/unet.derived.json", "ldm_text2im_large_256/bert.derived.json"]


def tracked_files() -> list[str]:
    """Files git tracks (what a clone gets); the test needs the checkout's git metadata."""
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.fail(f"git ls-files failed in {ROOT}: {out.stderr.strip()}")
    return out.stdout.splitlines()


def test_reference_is_inside_the_repository_and_tracked():
    assert os.path.commonpath([REFERENCE, ROOT]) == ROOT, f"REFERENCE {REFERENCE} lies outside {ROOT}"
    rel = os.path.relpath(REFERENCE, ROOT)
    tracked = set(tracked_files())
    needed = ["README.md"] + MANIFESTS + [os.path.join("configs", c) for c in CONFIGS]
    missing = [n for n in needed if os.path.join(rel, n) not in tracked]
    assert not missing, f"not in git (a clone would lack them): {missing}"


def test_no_source_reads_a_folder_beside_the_checkout():
    """Nothing the clone runs may reach ../shared (or any sibling of the checkout) for its data."""
    pattern = re.compile(r"""\.\./shared|["']shared["']\s*,\s*["']reference["']|dirname\(ROOT\)""")
    offenders = []
    for path in tracked_files():
        if not path.endswith((".py", ".sh", ".ini", ".cfg", ".toml")) and not path.startswith(".ci/"):
            continue
        with open(os.path.join(ROOT, path), encoding="utf-8", errors="replace") as f:
            for i, line in enumerate(f, 1):
                if pattern.search(line) and "test_fresh_clone.py" not in path:
                    offenders.append(f"{path}:{i}: {line.strip()}")
    assert not offenders, "reads outside the repository:\n" + "\n".join(offenders)


def readme_block_commands() -> tuple[str, list[str]]:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return quick, re.findall(r"```bash\n(.*?)```", quick, re.S)


def test_readme_quick_start_names_python_venv_and_cpu_wheel():
    quick, blocks = readme_block_commands()
    assert re.search(r"Python 3\.11 or newer", quick)
    assert "tomllib" in quick   # the reason for the version
    assert "python3 -m venv .venv && . .venv/bin/activate" in quick
    assert "--index-url\nhttps://download.pytorch.org/whl/cpu" in quick or \
        "--index-url https://download.pytorch.org/whl/cpu" in quick
    commands = [line for b in blocks for line in b.splitlines()]
    assert "pip install torch==2.13.0 -r requirements.txt && python sample.py" in commands
    assert "pip install torch==2.13.0 -r requirements-dev.txt && python -m pytest -q" in commands


def test_ci_runs_the_readme_test_command_verbatim():
    _, blocks = readme_block_commands()
    test_cmd = next(line for b in blocks for line in b.splitlines() if "pytest" in line)
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    # CI calls python3 explicitly (no venv there); the command is otherwise the README's, character for character
    assert test_cmd.replace("pip install", "python3 -m pip install -q").replace("&& python ", "&& python3 ") in ci


def test_train_finds_the_embedded_model_from_any_directory(tmp_path, monkeypatch):
    """`python train.py` run elsewhere picks weights/minisd-tiny of this checkout, not the tiny-random fallback."""
    import train
    from minisd.train.cli import parse_config
    data = tmp_path / "data"
    data.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg, flags = parse_config(["--data", str(data), "--out", str(tmp_path / "run")])
    assert cfg.model is None   # the default is filled by prepare(), which knows the machine
    train.prepare(cfg, flags)
    assert os.path.isabs(cfg.model)
    assert os.path.samefile(cfg.model, os.path.join(ROOT, "weights", "minisd-tiny"))
