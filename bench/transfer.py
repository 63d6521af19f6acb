"""Meta-transfer learning against meta-learning from scratch, in-domain and cross-domain: one command, every cell.

Every row trains through the real CLI, each in a fresh process, on Omniglot's minimal background splits only
(the training alphabets; budgets in steps, so the numbers do not depend on what else the machine runs), and every
column scores it with ``mtl-ray eval``:

rows (``--rows``, by key; :data:`ROWS`)
  maml          MAML from scratch                           jobs/configs/omniglot_maml.yaml
  protonet      ProtoNets from scratch                      jobs/configs/omniglot_protonet.yaml
  probe_linear  pretrain-only, linear probe                 the pretraining run, ``pretrain.probe=linear``
  probe_cosine  pretrain-only, cosine probe                 the pretraining run, ``pretrain.probe=cosine``
  metasgd       pretrain + Meta-SGD (all weights)           jobs/configs/omniglot_metasgd_pretrained.yaml
  mtl           pretrain + MTL (frozen body, scale/shift, hard tasks) jobs/configs/omniglot_mtl.yaml
  meta_baseline Meta-Baseline from the pretrained body      omniglot_protonet.yaml, ``algorithm.name=meta_baseline``
  r2d2          R2-D2 from the pretrained body              omniglot_protonet.yaml, ``algorithm.name=r2d2``
  pmf           P>M>F: ProtoNet from the pretrained body + test-time fine-tuning (``algorithm.finetune_*``)
  pmf_tuned     the pmf run deployed per target domain by ``mtl-ray deploy`` (jobs/configs/deploy_*.yaml: a Ray
                Tune search of the fine-tuning values on the target's validation episodes), scored as deployed
The pretraining run (jobs/configs/omniglot_pretrain.yaml with :func:`pretrain_overrides`: a cosine head and a
warmed-up cosine schedule, then any ``--pretrain-override``) is trained once, when a selected row needs it.

columns (:data:`COLUMNS`)
  held-out Omniglot alphabets (Korean, Tagalog) 5-way 1-shot and 5-shot; Lake's 20-way within-alphabet
  one-shot runs 01-10 (``--lake``: error rate over its 200 trials); held-out printed-glyph scripts
  (``data.source=glyphs``, its test split: scripts picked by a hash of their name, rendered from the Noto fonts
  under <data root>/fonts); scikit-learn's digits; Fashion-MNIST (all 5-way 1-shot).

Each accuracy cell is the mean ± 95% CI over ``--episodes`` fixed test episodes (default 600, 15 queries per
class); a Lake cell is the error rate ± its binomial 95% CI over the 200 trials. Head-based learners trained
5-way (MAML, Meta-SGD, MTL) have no 20-output head for Lake's runs: their Lake cell is "n/a".

Hooks: a row's ``train_overrides`` are extra training overrides (pretrain + MTL's ``optim.hard_tasks=8``; more
with ``--row-override ROW=KEY=VALUE``), its ``eval_overrides`` apply to every
column and ``column_overrides`` per column (e.g. Tune-chosen fine-tuning values for P>M>F per target domain).

    python bench/transfer.py                                   # the table in docs/transfer.md (hours on 2 cores)
    python bench/transfer.py --scale 0.02 --episodes 20 --doc /tmp/transfer.md   # every cell, minutes
    python bench/transfer.py --rows protonet,pmf --reuse bench/out/transfer/20261203-120000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lake import TRIALS, cli_and_env, run  # bench/lake.py: the CLI and its data root; run a command, tee its log

from mtl_ray.atomic import atomic_write

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "jobs" / "configs"
LAKE = "Lake 20-way runs 01-10, error"
COLUMNS: dict[str, list[str]] = {  # column -> eval overrides (LAKE: ``--lake`` instead of episodes)
    "Omniglot held-out alphabets, 5-way 1-shot": [],
    "Omniglot held-out alphabets, 5-way 5-shot": ["data.shots=5"],
    LAKE: [],
    "glyph scripts (test split), 5-way 1-shot": ["data.source=glyphs"],
    "digits, 5-way 1-shot": ["data.source=digits"],
    "Fashion-MNIST, 5-way 1-shot": ["data.source=fashion_mnist"],
}
ACC = re.compile(r"meta_test/acc: ([\d.]+)% ± ([\d.]+)%")
LAKE_ERR = re.compile(r"(\d+) runs: error ([\d.]+)%")
PRETRAIN = "pretrain"  # the shared pretraining run's key


def pretrain_overrides(steps: int) -> list[str]:
    """The pretraining run's overrides of jobs/configs/omniglot_pretrain.yaml: Baseline++'s cosine head (Chen et al.
    2019) and cosine annealing after a linear warm-up of 5% of the steps (Tian et al. 2020; Chen et al. 2021)."""
    return ["pretrain.head=cosine", "pretrain.schedule=cosine", f"pretrain.warmup_steps={max(steps // 20, 0)}"]


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    config: str  # under jobs/configs; "" for rows that score the pretraining run itself
    budget: str  # which --*-steps budget it trains for ("" for pretrain-only rows)
    init: bool = False  # meta-trains from the pretraining run's body (model.init)
    train_overrides: tuple[str, ...] = ()
    eval_overrides: tuple[str, ...] = ()  # every column
    column_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)  # per column, after eval_overrides
    head_based: bool = False  # a 5-output head: no cell for Lake's 20-way runs
    trained_as: str = ""  # another row's key: score that row's training run (the same config and overrides)
    deploy: dict[str, str] = field(default_factory=dict)  # column -> a deploy file (jobs/configs): score the run's
    # deployment (`mtl-ray deploy`: the Tune-chosen test-time values recorded with it), not the run itself


FINETUNE = ("algorithm.finetune_steps=20", "algorithm.finetune_lr=0.01")  # README's measured setting
OMNIGLOT = ("Omniglot held-out alphabets, 5-way 1-shot", "Omniglot held-out alphabets, 5-way 5-shot", LAKE)
CROSS_DOMAIN = ("glyph scripts (test split), 5-way 1-shot", "digits, 5-way 1-shot", "Fashion-MNIST, 5-way 1-shot")
ROWS: tuple[Row, ...] = (
    Row("maml", "MAML from scratch", "omniglot_maml.yaml", "scratch_maml", head_based=True),
    Row("protonet", "ProtoNets from scratch", "omniglot_protonet.yaml", "scratch_protonet"),
    Row("probe_linear", "pretrain-only, linear probe (Baseline)", "", "", eval_overrides=("pretrain.probe=linear",)),
    Row("probe_cosine", "pretrain-only, cosine probe (Classifier-Baseline)", "", "",
        eval_overrides=("pretrain.probe=cosine",)),
    Row("metasgd", "pretrain + Meta-SGD (all weights)", "omniglot_metasgd_pretrained.yaml", "meta", init=True,
        head_based=True),
    # MTL's hard-task meta-batch (Sun et al. 2019 Sec. 4.2): a quarter of the meta-batch again, re-sampled from the
    # step's failure classes, as an additional outer step
    Row("mtl", "pretrain + MTL (frozen body; scale/shift; hard tasks)", "omniglot_mtl.yaml", "meta", init=True,
        head_based=True, train_overrides=("optim.hard_tasks=8",)),
    Row("meta_baseline", "pretrain + Meta-Baseline", "omniglot_protonet.yaml", "metric", init=True,
        train_overrides=("algorithm.name=meta_baseline",)),
    Row("r2d2", "pretrain + R2-D2", "omniglot_protonet.yaml", "metric", init=True,
        train_overrides=("algorithm.name=r2d2",)),
    # P>M>F (Hu et al. 2022): pretrained body -> ProtoNet meta-training -> test-time fine-tuning. Augmented copies of
    # the support set only for the cross-domain columns (README: they help there, and hurt on Omniglot). Hook: a row
    # with Tune-chosen values (another branch's deployment search) sets column_overrides per column likewise.
    Row("pmf", "P>M>F: pretrain + ProtoNet + test-time fine-tuning", "omniglot_protonet.yaml", "metric", init=True,
        eval_overrides=FINETUNE,
        column_overrides={c: ("algorithm.finetune_augment=true",) for c in CROSS_DOMAIN}),
    # the same run, deployed per target domain by `mtl-ray deploy` (a Ray Tune search over finetune_steps, _lr and
    # _augment on the target's validation episodes; Omniglot's file serves its three columns)
    Row("pmf_tuned", "P>M>F with Tune-chosen fine-tuning per domain", "omniglot_protonet.yaml", "metric", init=True,
        trained_as="pmf", deploy={**{c: "deploy_omniglot.yaml" for c in OMNIGLOT},
                                  "glyph scripts (test split), 5-way 1-shot": "deploy_glyphs.yaml",
                                  "digits, 5-way 1-shot": "deploy_digits.yaml",
                                  "Fashion-MNIST, 5-way 1-shot": "deploy_fashion.yaml"}),
)
BUDGETS = {  # --*-steps defaults: MAML gets about the time of pretraining + meta-training (docs/transfer.md)
    "scratch_maml": 70, "scratch_protonet": 1000, "pretrain": 1500, "meta": 40, "metric": 300,
}


def summary_numbers(out: str) -> tuple[int | None, float]:
    """(steps reached, the run's own training seconds) from `mtl-ray train`/`pretrain`'s summary lines."""
    steps = re.search(r"(?:pretrained to step |steps: )(\d+)", out)
    secs = re.search(r"(?:time: |pretrained to step \d+ in )([\d.]+)s", out)
    return (int(steps.group(1)) if steps else None), (float(secs.group(1)) if secs else float("nan"))


def lake_cell(out: str) -> dict[str, float]:
    """Lake's error rate and its normal-approximation binomial 95% CI half-width over the runs' trials, in %."""
    m = LAKE_ERR.search(out)
    if m is None:
        raise SystemExit(f"no Lake error rate in:\n{out[-2000:]}")
    runs, err = int(m.group(1)), float(m.group(2))
    n = runs * TRIALS // 10  # 20 trials a run
    p = err / 100.0
    return {"error_pct": err, "ci95_pct": 100.0 * 1.96 * math.sqrt(p * (1 - p) / n), "trials": float(n)}


def acc_cell(out: str) -> dict[str, float]:
    m = ACC.search(out)
    if m is None:
        raise SystemExit(f"no meta_test/acc in:\n{out[-2000:]}")
    return {"acc_pct": float(m.group(1)), "ci95_pct": float(m.group(2))}


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.cli, self.env = cli_and_env(args.data_dir)
        self.work: Path = args.reuse or args.work_dir / time.strftime("%Y%m%d-%H%M%S")
        self.steps = {k: max(1, round(getattr(args, f"{k}_steps") * args.scale)) for k in BUDGETS}
        self.extra = dict(args.row_override)

    def _cached(self, marker: Path, cmd: list[str], log: Path) -> tuple[str, float]:
        """The command's output and wall seconds: from ``marker`` (a finished earlier run, ``--reuse``) or by running
        it; the marker is written only after it succeeded, so a failed command runs again."""
        if marker.is_file():
            done = json.loads(marker.read_text())
            return log.read_text(), float(done["wall_s"])
        t0 = time.perf_counter()
        out = run(cmd, self.env, log)
        wall = time.perf_counter() - t0
        atomic_write(marker, json.dumps({"wall_s": wall, "command": cmd}))
        return out, wall

    def train(self, key: str, command: str, config: str, steps: int, overrides: Sequence[str]) -> dict:
        run_dir = self.work / key
        run_dir.mkdir(parents=True, exist_ok=True)
        budget = ([f"pretrain.steps={steps}", "pretrain.max_minutes=0"] if command == "pretrain"
                  else [f"optim.steps={steps}", "optim.max_minutes=0"])
        cmd = [*self.cli, command, str(CONFIGS / config), *budget, "tracking.progress=false", *overrides,
               "--run-dir", str(run_dir)]
        out, wall = self._cached(run_dir / f"{command}.done.json", cmd, run_dir / f"{command}.log")
        reached, secs = summary_numbers(out)
        return {"run_dir": str(run_dir), "config": f"jobs/configs/{config}", "overrides": [*budget, *overrides],
                "steps": reached, "train_s": secs, "wall_s": wall}

    def pretrained(self) -> dict:
        if not hasattr(self, "_pre"):
            steps = self.steps["pretrain"]
            self._pre = self.train(PRETRAIN, "pretrain", "omniglot_pretrain.yaml", steps,
                                   [*pretrain_overrides(steps), *self.args.pretrain_override])
        return self._pre

    def train_row(self, row: Row) -> dict:
        if not row.config:  # pretrain-only: the pretraining run, scored by its probe
            return {**self.pretrained(), "eval_overrides": list(row.eval_overrides)}
        extra = list(row.train_overrides) + list(self.extra.get(row.key, []))
        if row.init:
            extra.append(f"model.init={self.pretrained()['run_dir']}")
        trained = self.train(row.trained_as or row.key, "train", row.config, self.steps[row.budget], extra)
        return {**trained, "eval_overrides": list(row.eval_overrides)}

    def deployed(self, row: Row, m: dict, deploy_file: str) -> dict:
        """``mtl-ray deploy`` of the row's run with ``deploy_file`` (once per file): its directory and search."""
        out = Path(m["run_dir"]) / f"deploy-{Path(deploy_file).stem.removeprefix('deploy_')}"
        cmd = [*self.cli, "deploy", m["run_dir"], str(CONFIGS / deploy_file), "--out", str(out), "--overwrite"]
        tag = f"{row.key}-{out.name}"
        text, wall = self._cached(Path(m["run_dir"]) / f"{tag}.done.json", cmd, Path(m["run_dir"]) / f"{tag}.log")
        chosen = re.search(r"^chosen: (.*)$", text, re.M)
        return {"dir": str(out), "chosen": chosen.group(1) if chosen else "", "wall_s": wall,
                "command": shlex.join(["mtl-ray", *cmd[3:]])}

    def score(self, row: Row, m: dict) -> None:
        m["eval"] = {}
        for i, (column, overrides) in enumerate(COLUMNS.items()):
            if column == LAKE and row.head_based:
                m["eval"][column] = {"na": "a 5-output head: no 20-way Lake runs"}
                continue
            ov = [*overrides, *row.eval_overrides, *row.column_overrides.get(column, ())]
            target, deployment = m["run_dir"], None
            if column in row.deploy:  # the deployed checkpoint carries the target's keys and the chosen values
                deployment = self.deployed(row, m, row.deploy[column])
                target = deployment["dir"]
            what = ["--lake"] if column == LAKE else ["--episodes", str(self.args.episodes)]
            cmd = [*self.cli, "eval", target, *ov, *what]  # --lake last: it takes an optional path
            tag = f"eval-{row.key}-{i}"
            out, wall = self._cached(Path(m["run_dir"]) / f"{tag}.done.json", cmd, Path(m["run_dir"]) / f"{tag}.log")
            cell = lake_cell(out) if column == LAKE else acc_cell(out)
            cell.update({"command": shlex.join(["mtl-ray", *cmd[3:]]), "wall_s": wall})
            if deployment is not None:
                cell["deploy"] = deployment
            m["eval"][column] = cell
            print(f"{row.label} | {column}: {fmt(cell)}", flush=True)


def fmt(cell: dict) -> str:
    if "na" in cell:
        return "n/a"
    v = cell["error_pct"] if "error_pct" in cell else cell["acc_pct"]
    return f"{v:.1f}% ± {cell['ci95_pct']:.1f}%"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(r.key for r in ROWS), help="comma-separated row keys (default: all)")
    for k, v in BUDGETS.items():
        p.add_argument(f"--{k.replace('_', '-')}-steps", dest=f"{k}_steps", type=int, default=v,
                       help=f"steps of the {k} budget (default {v})")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every budget (at least 1 step each)")
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--row-override", action="append", default=[], metavar="ROW=KEY=VALUE",
                   type=lambda s: tuple(s.split("=", 1)), help="an extra training override of one row (repeatable)")
    p.add_argument("--pretrain-override", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra override of the pretraining run, after the defaults (e.g. pretrain.head=linear "
                        "pretrain.schedule=constant for today's pretraining; repeatable)")
    p.add_argument("--data-dir", default=None, help="data root (default $MTL_RAY_DATA_DIR or ../shared/data)")
    p.add_argument("--work-dir", type=Path, default=ROOT / "bench" / "out" / "transfer", help="run directories")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "transfer.json")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "transfer.md")
    p.add_argument("--reuse", type=Path, default=None,
                   help="an earlier run's work dir: reuse its finished runs and evaluations, do the missing ones")
    args = p.parse_args(argv)
    known = {r.key for r in ROWS}
    args.selected = [k for k in args.rows.split(",") if k]
    bad = [k for k in args.selected + [k for k, _ in args.row_override] if k not in known]
    if bad:
        p.error(f"unknown row(s) {bad}; expected some of: {', '.join(sorted(known))}")
    overrides: dict[str, list[str]] = {}
    for k, v in args.row_override:
        overrides.setdefault(k, []).append(v)
    args.row_override = overrides
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    t0 = time.perf_counter()
    rows = [next(r for r in ROWS if r.key == k) for k in dict.fromkeys(args.selected)]  # in --rows order
    methods: dict[str, dict] = {}
    for row in rows:  # train every row first, then score: a failed evaluation leaves the trained runs reusable
        methods[row.key] = {"label": row.label, **bench.train_row(row)}
    for row in rows:
        bench.score(row, methods[row.key])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    results = {"episodes": args.episodes, "cpus": os.cpu_count(), "steps": bench.steps, "scale": args.scale,
               "argv": args.argv, "commit": commit.stdout.strip(), "total_s": time.perf_counter() - t0,
               "pretrain": getattr(bench, "_pre", None), "methods": methods}
    atomic_write(args.out, json.dumps(results, indent=2))
    atomic_write(args.doc, render(results))
    print(render(results))
    print(f"wrote {args.out} and {args.doc}")
    return 0


def _rel(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return path


def render(results: dict) -> str:
    cols = list(COLUMNS)
    pre = results["pretrain"]
    head = "| method | training (wall time here) | " + " | ".join(cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for key, m in results["methods"].items():
        row = next(r for r in ROWS if r.key == key)
        if not row.config:
            training = "the pretraining run"
        elif row.trained_as:
            training = f"the {next(r.label for r in ROWS if r.key == row.trained_as).split(':')[0]} run + searches"
        else:
            training = f"{m['steps']} steps, {m['wall_s'] / 60:.1f} min"
            if row.init:
                training += " + pretraining"
        cells = [fmt(m["eval"][c]) for c in cols]
        lines.append(f"| {m['label']} | {training} | " + " | ".join(cells) + " |")
    how = []
    if pre is not None:
        how.append(f"- pretraining (shared by every pretrain row): `{pre['config']}` with "
                   f"`{' '.join(pre['overrides'])}`; {pre['steps']} steps of 128 images, {pre['wall_s'] / 60:.1f} "
                   f"min wall time ({pre['train_s'] / 60:.1f} min training); run dir `{_rel(pre['run_dir'])}`")
    for key, m in results["methods"].items():
        row = next(r for r in ROWS if r.key == key)
        ev = " ".join(m["eval_overrides"]) or "none"
        per_col = "; ".join(f"{c}: `{' '.join(o)}`" for c, o in row.column_overrides.items())
        if not row.config:
            how.append(f"- {m['label']}: the pretraining run, eval overrides `{ev}`")
            continue
        how.append(f"- {m['label']}: `{m['config']}` with `{' '.join(m['overrides'])}`; {m['steps']} steps, "
                   f"{m['wall_s'] / 60:.1f} min wall time ({m['train_s'] / 60:.1f} min training); eval overrides "
                   f"`{ev}`" + (f", and per column {per_col}" if per_col else "") + f"; run dir `{_rel(m['run_dir'])}`")
        searches = {c["deploy"]["dir"]: c["deploy"] for c in m["eval"].values() if "deploy" in c}
        for where, d in searches.items():
            cols_of = ", ".join(c for c, cell in m["eval"].items() if cell.get("deploy", {}).get("dir") == where)
            how.append(f"  - {cols_of}: `{d['command'].replace(str(ROOT) + '/', '')}` chose `{d['chosen']}` "
                       f"({d['wall_s'] / 60:.1f} min); scored as the deployed directory `{_rel(where)}`")
    steps = results["steps"]
    argv = list(results["argv"])
    while "--reuse" in argv:  # the cache of finished runs it read, not a setting: the same numbers without it
        at = argv.index("--reuse")
        del argv[at:at + 2]
    command = shlex.join(["python", "bench/transfer.py", *argv])
    return "\n".join([
        "# Meta-transfer learning: results",
        "",
        f"Generated by `{command}` (do not edit by hand; commit {results['commit']}, {results['cpus']}-core CPU, "
        f"{results['total_s'] / 3600:.1f} h in all). Accuracy cells: mean ± 95% confidence interval over "
        f"{results['episodes']} fixed test episodes (15 queries per class). The Lake column: the error rate over "
        "Lake's 20-way within-alphabet one-shot runs 01-10 (200 trials) ± its binomial 95% CI; lower is better. "
        "Every method was trained on Omniglot's minimal background splits only (training alphabets); the held-out "
        "alphabets (Korean, Tagalog), Lake's runs (the evaluation alphabets), the printed-glyph scripts of the "
        "glyphs source's test split (Noto fonts: printed, not handwritten), scikit-learn's 8x8 digits (upsampled "
        "to 28x28) and Fashion-MNIST were never seen in training.",
        "",
        *lines,
        "",
        "n/a: a head-based learner trained 5-way has no head for Lake's 20 classes (train with `data.ways=20`).",
        "",
        f"Budgets in steps (scale {results['scale']:g}), so load on the machine does not change the numbers: "
        + ", ".join(f"{k} {v}" for k, v in steps.items()) + ". The training column is each run's measured wall "
        "time here (process start to exit); rows marked + pretraining add the shared pretraining run's.",
        "",
        "How each number was produced (`mtl-ray eval RUN_DIR --episodes N [column overrides] [row overrides]`, "
        "or `--lake`; the column overrides: "
        + "; ".join(f"{c}: `{' '.join(o) or ('--lake' if c == LAKE else 'none')}`" for c, o in COLUMNS.items())
        + "):",
        "",
        *how,
        "",
        "Pretrain-only rows score the pretraining run's body: the linear probe fine-tunes a zero-initialised linear "
        "head on each support set (pretrain.probe_steps full-batch steps of pretrain.probe_lr; Chen et al. 2019's "
        "Baseline); the cosine probe classifies by cosine similarity to the support set's class means, no steps "
        "(Chen et al. 2021's Classifier-Baseline). bench/out/transfer.json holds every command.",
        "",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
