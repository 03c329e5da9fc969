"""bench/methods_grid.py: one cell trained, sampled and scored end to end (tiny-random, one step), a refused cell
recorded with its error line, and the aggregate's mean ± standard deviation by hand."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import methods_grid as grid  # noqa: E402


def test_one_cell_end_to_end(tmp_path):
    out = tmp_path / "g"
    rc = grid.main(["--out", str(out), "--cells", "db-lora-prior", "--seeds", "3", "--steps", "1",
                    "--model", "tiny-random", "--n-eval", "2", "--n-images", "4", "--n-subject", "2",
                    "--n-class", "2", "--sample-steps", "1"])
    assert rc == 0
    res = json.load(open(out / "results.json"))
    runs = {r["cell"]: r for r in res["runs"]}
    db = runs["db-lora-prior"]
    assert "error" not in db, db
    for k in ("subject", "size", "position", "background", "leak", "class_leak", "trainable_params", "file_mb",
              "s_per_step", "final_loss"):
        assert db[k] is not None, k
    assert 0 <= db["class_leak"] <= 1 and db["trainable_params"] > 0 and db["file_mb"] > 0
    assert os.path.isfile(out / "runs" / "db-lora-prior" / "seed_3" / "result.json")
    assert len(os.listdir(out / "data" / "class-images")) >= 4  # 2 class images + captions, drawn once
    md = open(out / "results.md").read()
    assert "| db-lora-prior | 1 |" in md and "## subject" in md


def test_aggregate_by_hand():
    rows = [{"cell": "loha", "seed": s, "style_adoption": v, "file_mb": 2.0} for s, v in ((0, 0.5), (1, 0.75),
                                                                                         (2, 1.0))]
    rows.append({"cell": "ti", "seed": 0, "error": "error: argument --method: invalid choice: 'ti'"})
    agg = grid.aggregate(rows)
    mean, sd, n = agg["loha"]["style_adoption"]
    assert (mean, n) == (0.75, 3) and abs(sd - 0.25) < 1e-12  # sample sd of 0.5, 0.75, 1.0
    assert agg["ti"]["seeds"] == 0 and agg["ti"]["errors"] == ["error: argument --method: invalid choice: 'ti'"]
    assert "| loha | 3 | 75 ± 25 % |" in grid.table(agg, "style")


def test_bad_cell_is_refused(capsys):
    with pytest.raises(SystemExit):
        grid.main(["--cells", "nope"])
    assert "unknown cell(s) nope" in capsys.readouterr().err
