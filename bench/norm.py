"""What non-transductive normalisation costs: model.norm=support against model.norm=transductive.

For each algorithm and each mode, one training run through the real CLI in a fresh process, with the
same budget in steps (``--steps``), on Omniglot's minimal background splits; then ``mtl-ray eval`` on
  * Lake's 20-way within-alphabet one-shot runs 01-10 (error %, 200 trials),
  * the held-out alphabets (Korean, Tagalog) 5-way 1-shot,
  * scikit-learn's digits 5-way 1-shot (never seen in training),
each scored in the mode the run was trained in, and Lake's runs once more through the Python API one query
per call, as a served model is asked (a transductive model with ``transductive=True``). Writes the table and
the command behind every number to ``--doc`` (docs/normalisation.md) and the raw numbers to ``--out``.

    python bench/norm.py                                    # protonet 300 steps, maml 150; 600 episodes
    python bench/norm.py --algorithms protonet:100 --episodes 100
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

import torch
from lake import cli_and_env, run  # bench/lake.py: the CLI and its data root; run a command, tee its log

from mtl_ray.atomic import atomic_write

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "jobs" / "configs"
MODES = ("support", "transductive")
EVALS = {  # column -> eval arguments
    "Lake runs 01-10, 20-way 1-shot (error)": ["--lake"],
    "held-out alphabets, 5-way 1-shot": [],
    "digits, 5-way 1-shot": ["data.source=digits"],
}
ONE_BY_ONE = "Lake, one query per call (Python API)"
TIME = re.compile(r"time: ([\d.]+)s")
ACC = re.compile(r"meta_test/acc: ([\d.]+)% ± ([\d.]+)%")
LAKE = re.compile(r"error ([\d.]+)%")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algorithms", nargs="+", default=["protonet:300", "maml:150"],
                   help="ALG:STEPS each: jobs/configs/omniglot_<ALG>.yaml trained for STEPS steps in each mode")
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--data-dir", default=None, help="data root (default $MTL_RAY_DATA_DIR or ../shared/data)")
    p.add_argument("--work-dir", type=Path, default=ROOT / "bench" / "out" / "norm", help="run directories")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "norm.json")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "normalisation.md")
    p.add_argument("--reuse", type=Path, default=None,
                   help="an earlier run's work dir: keep its finished trainings and evaluations, do the rest")
    args = p.parse_args(argv)

    cli, env = cli_and_env(args.data_dir)
    work = args.reuse or args.work_dir / time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for item in args.algorithms:
        alg, _, steps = item.partition(":")
        if not steps.isdigit():
            p.error(f"--algorithms: got {item!r}, expected ALG:STEPS such as protonet:1000")
        for mode in MODES:
            run_dir = work / f"{alg}-{mode}"
            overrides = [f"optim.steps={steps}", "optim.max_minutes=0", f"model.norm={mode}",
                         "scaling.num_workers=0", "tracking.progress=false", "tracking.mlflow=false"]
            config = f"jobs/configs/omniglot_{alg}.yaml"
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            train_log = run_dir.parent / f"{alg}-{mode}.train.log"
            if args.reuse and train_log.is_file():
                out = train_log.read_text()
            else:
                out = run([*cli, "train", str(ROOT / config), *overrides, "--run-dir", str(run_dir)], env, train_log)
            secs = TIME.search(out)  # the run's own training time, from its summary line
            row = {"algorithm": alg, "norm": mode, "steps": int(steps), "config": config, "overrides": overrides,
                   "train_s": float(secs.group(1)) if secs else float("nan"), "eval": {}}
            head = alg not in ("protonet", "relationnet")  # a 5-way head cannot answer Lake's 20-way runs
            for column, extra in EVALS.items():
                if head and "--lake" in extra:
                    row["eval"][column] = {"na": "5-way head", "command": ""}
                    continue
                cmd = [*cli, "eval", str(run_dir), *extra]
                if "--lake" not in extra:
                    cmd += ["--episodes", str(args.episodes)]
                log = run_dir / f"eval-{len(row['eval'])}.log"
                out = log.read_text() if args.reuse and log.is_file() else run(cmd, env, log)
                if "--lake" in extra:
                    cell = {"error_pct": float(LAKE.search(out).group(1))}
                else:
                    mean, half = (float(v) for v in ACC.search(out).groups())
                    cell = {"acc_pct": mean, "ci95_pct": half}
                cell["command"] = " ".join(["mtl-ray", *cmd[3:]]).replace(str(work), "$WORK")
                row["eval"][column] = cell
                print(f"{alg} {mode} | {column}: {cell}", flush=True)
            row["eval"][ONE_BY_ONE] = {"na": "5-way head", "command": ""} if head else {
                "error_pct": lake_one_query_per_call(run_dir, env["MTL_RAY_DATA_DIR"]),
                "command": "FewShotLearner.from_checkpoint(RUN).adapt(...).predict(query[None])"}
            print(f"{alg} {mode} | {ONE_BY_ONE}: {row['eval'][ONE_BY_ONE]}", flush=True)
            rows.append(row)
    results = {"episodes": args.episodes, "cpus": os.cpu_count(), "work": str(work),
               "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps(results, indent=2))
    atomic_write(args.doc, render(results))
    print(render(results))
    print(f"wrote {args.out} and {args.doc}")
    return 0


def lake_one_query_per_call(run_dir: Path, data_dir: str) -> float:
    """Error % on Lake's runs 01-10 through the Python API, each query in a call of its own."""
    from mtl_ray.api import FewShotLearner
    from mtl_ray.data.lake import default_lake_path, lake_error_rate, load_lake_runs

    learner = FewShotLearner.from_checkpoint(run_dir)
    transductive = learner.cfg.model.norm == "transductive"
    runs = load_lake_runs(default_lake_path(data_dir), learner.shape.x_shape[-1])
    preds = []
    for r in runs:
        adapted = learner.adapt(r.support_x, r.support_y)
        preds.append(torch.tensor([adapted.predict(q[None], transductive=transductive)[0] for q in r.query_x]))
    return lake_error_rate(preds, runs)


def _cell(cell: dict) -> str:
    if "na" in cell:
        return f"n/a ({cell['na']})"
    if "error_pct" in cell:
        return f"{cell['error_pct']:.1f}%"
    return f"{cell['acc_pct']:.1f}% ± {cell['ci95_pct']:.1f}%"


def render(results: dict) -> str:
    cols = [*EVALS, ONE_BY_ONE]
    lines = ["| algorithm | model.norm | training | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 3)]
    for r in results["rows"]:
        cells = [_cell(r["eval"][c]) for c in cols]
        lines.append(f"| {r['algorithm']} | {r['norm']} | {r['steps']} steps, {r['train_s'] / 60:.1f} min | "
                     + " | ".join(cells) + " |")
    commands = [f"- {r['algorithm']}, {r['norm']}: `mtl-ray train {r['config']} {' '.join(r['overrides'])} "
                f"--run-dir $WORK/{r['algorithm']}-{r['norm']}`; then "
                + "; ".join(f"`{r['eval'][c]['command']}`" for c in EVALS if r["eval"][c]["command"])
                for r in results["rows"]]
    return "\n".join([
        "# Normalisation: what a prediction that does not depend on the batch costs",
        "",
        "Generated by `python bench/norm.py` (do not edit by hand). `model.norm=support` (the default) normalises "
        "every query with the statistics of its task's support set, so a prediction depends on the support set and "
        "that query alone; `model.norm=transductive` normalises each batch of queries with its own statistics "
        "(MAML's reference code and most papers), so a query's answer depends on the other queries scored with it. "
        "Each run is trained and scored in its own mode, with the same budget in steps, on Omniglot's minimal "
        f"background splits, on a {results['cpus']}-core CPU. Accuracy: mean ± 95% CI over {results['episodes']} "
        "episodes (15 queries per class); Lake: error over its 200 trials (20 queries per run, scored together).",
        "",
        *lines,
        "",
        "Commands ($WORK: the run's work directory):",
        "",
        *commands,
        "",
        f"The last column asks the same models as a served model is asked, one query per request, through "
        f"`{ONE_BY_ONE.split('(')[0].strip()}`'s Python API: a support-normalised model gives the same answers as in "
        "the batched column (bit for bit, by construction), a transductive one normalises each lone query with its "
        "own statistics (docs/architecture.md, \"Normalisation\").",
        "",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
