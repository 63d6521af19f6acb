"""bench/transfer.py's own logic, without training anything: row selection and budgets, what it reads from the CLI's
output, and the page it writes (every row and column, n/a where a head cannot score Lake's 20-way runs). The
end-to-end check is a run at a tiny ``--scale`` (minutes: Ray Train's start alone is most of a test's budget)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))  # after site-packages: shadows nothing
import transfer


def test_rows_budgets_and_row_overrides_from_the_command_line():
    args = transfer.parse_args(["--rows", "mtl,pmf", "--scale", "0.1", "--row-override", "mtl=optim.hard_tasks=true"])
    assert args.selected == ["mtl", "pmf"] and args.row_override == {"mtl": ["optim.hard_tasks=true"]}
    steps = transfer.Bench(args).steps
    assert steps["pretrain"] == 150 and steps["meta"] == 4 and steps["scratch_maml"] == 7
    assert transfer.Bench(transfer.parse_args(["--scale", "0.001"])).steps["meta"] == 1  # at least one step
    with pytest.raises(SystemExit):
        transfer.parse_args(["--rows", "mamll"])


def test_numbers_read_from_the_cli():
    assert transfer.summary_numbers("pretrained to step 30 in 41.5s: pretrain/loss=1.0") == (30, 41.5)
    assert transfer.summary_numbers("steps: 20  tasks: 320  tasks/s: 9.1  time: 35.2s  skipped steps: 0") == (20, 35.2)
    assert transfer.acc_cell("  meta_test/acc: 93.10% ± 0.70% (95% CI)") == {"acc_pct": 93.1, "ci95_pct": 0.7}
    lake = transfer.lake_cell("Lake 20-way within-alphabet one-shot, 10 runs: error 12.50% (accuracy 87.50%)")
    assert lake["trials"] == 200 and lake["error_pct"] == 12.5
    assert math.isclose(lake["ci95_pct"], 100 * 1.96 * math.sqrt(0.125 * 0.875 / 200))


def test_the_page_has_every_row_and_column_and_the_command_that_regenerates_it():
    cell = {"acc_pct": 50.0, "ci95_pct": 1.0, "command": "mtl-ray eval x", "wall_s": 1.0}
    run = {"run_dir": "/tmp/r", "config": "jobs/configs/c.yaml", "overrides": ["optim.steps=1"], "steps": 1,
           "train_s": 6.0, "wall_s": 60.0}
    methods = {}
    for row in transfer.ROWS:
        ev = {c: ({"na": "head"} if c == transfer.LAKE and row.head_based
                  else {"error_pct": 10.0, "ci95_pct": 4.2} if c == transfer.LAKE else cell) for c in transfer.COLUMNS}
        for c, f in row.deploy.items():  # a deployed column: its search, once per deploy file
            ev[c] = {**ev[c], "deploy": {"dir": f"/tmp/r/deploy-{f}", "chosen": f"algorithm.finetune_steps={len(f)}",
                                         "wall_s": 30.0, "command": f"mtl-ray deploy /tmp/r jobs/configs/{f}"}}
        methods[row.key] = {"label": row.label, **run, "eval_overrides": list(row.eval_overrides), "eval": ev}
    page = transfer.render({"episodes": 600, "cpus": 2, "steps": {"meta": 40}, "scale": 1.0,
                            "argv": ["--reuse", "x", "--rows", "mtl"], "commit": "abc", "total_s": 7200.0,
                            "pretrain": run, "methods": methods})
    assert "`python bench/transfer.py --rows mtl`" in page
    table = [line for line in page.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(transfer.ROWS) and all(c in table[0] for c in transfer.COLUMNS)
    assert sum("n/a" in line for line in table) == sum(r.head_based for r in transfer.ROWS) == 3
    assert "algorithm.finetune_augment=true" in page and "pretrain.probe=cosine" in page
    tuned = next(r for r in transfer.ROWS if r.deploy)  # P>M>F with Tune-chosen values: every column deployed
    assert set(tuned.deploy) == set(transfer.COLUMNS) and tuned.trained_as == "pmf"
    searches = [line for line in page.splitlines() if line.startswith("  - ") and "mtl-ray deploy" in line]
    assert len(searches) == len(set(tuned.deploy.values())) == 4  # Omniglot's one search serves its 3 columns
    assert all(f"algorithm.finetune_steps={len(f)}" in page for f in tuned.deploy.values())
