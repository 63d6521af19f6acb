"""Meta-transfer learning against meta-learning from scratch, in-domain and cross-domain.

Trains, each through the real CLI in a fresh process on the minimal background splits:
  1. from-scratch MAML            jobs/configs/omniglot_maml.yaml              (``--scratch-steps``)
  2. pretraining (Ray Train)      jobs/configs/omniglot_pretrain.yaml          (``--pretrain-steps``)
  3. pretrain + Meta-SGD          jobs/configs/omniglot_metasgd_pretrained.yaml (``--meta-steps``)
  4. pretrain + MTL (frozen body) jobs/configs/omniglot_mtl.yaml               (``--meta-steps``)
then scores each with ``mtl-ray eval --episodes N`` (the pretraining run "pretrain-only": a linear head
fine-tuned on each support set) on (a) the held-out alphabets (Korean, Tagalog) 5-way 1-shot and
(b) scikit-learn's digits 5-way 1-shot and 5-shot. Writes the table, with mean accuracy ± 95% CI and
the command behind every number, to ``--doc`` (docs/transfer.md).

Budgets are in steps, so the numbers do not depend on what else the machine runs; the defaults take
about 10 minutes for scratch MAML and 4 + 4-6 for pretraining + meta-training on an idle 2-core CPU,
so scratch MAML gets about as much time as the two stages together.

    python bench/transfer.py                                   # 600 episodes per cell
    python bench/transfer.py --scratch-steps 5 --pretrain-steps 100 --meta-steps 3 --episodes 50
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

from lake import cli_and_env, run  # bench/lake.py: the CLI and its data root; run a command, tee its log

from mtl_ray.atomic import atomic_write

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "jobs" / "configs"
EVALS = {  # column -> eval overrides
    "Omniglot held-out alphabets, 5-way 1-shot": [],
    "digits, 5-way 1-shot": ["data.source=digits"],
    "digits, 5-way 5-shot": ["data.source=digits", "data.shots=5"],
}
ACC = re.compile(r"meta_test/acc: ([\d.]+)% ± ([\d.]+)%")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scratch-steps", type=int, default=70)
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--meta-steps", type=int, default=40)
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--data-dir", default=None, help="data root (default $MTL_RAY_DATA_DIR or ../shared/data)")
    p.add_argument("--work-dir", type=Path, default=ROOT / "bench" / "out" / "transfer", help="run directories")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "transfer.json")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "transfer.md")
    p.add_argument("--reuse", type=Path, default=None,
                   help="an earlier run's work dir: reuse its finished runs and evaluations, do the missing ones")
    args = p.parse_args(argv)

    cli, env = cli_and_env(args.data_dir)
    work = args.reuse or args.work_dir / time.strftime("%Y%m%d-%H%M%S")
    quiet = ["tracking.progress=false"]

    def train(name: str, command: str, config: str, steps: int, *extra: str) -> dict:
        run_dir = work / name
        run_dir.mkdir(parents=True, exist_ok=True)
        budget = (f"pretrain.steps={steps} pretrain.max_minutes=0" if command == "pretrain"
                  else f"optim.steps={steps} optim.max_minutes=0").split()
        cmd = [*cli, command, str(CONFIGS / config), *budget, *quiet, *extra, "--run-dir", str(run_dir)]
        log = run_dir / f"{command}.log"
        out = log.read_text() if args.reuse and log.is_file() else run(cmd, env, log)
        steps = re.search(r"(?:pretrained to step |steps: )(\d+)", out)
        secs = re.search(r"(?:time: |in )([\d.]+)s", out)  # the run's own training time, from its summary
        return {"run_dir": str(run_dir), "config": f"jobs/configs/{config}",
                "overrides": [*budget, *extra], "steps": int(steps.group(1)) if steps else None,
                "train_s": float(secs.group(1)) if secs else float("nan")}

    methods: dict[str, dict] = {}
    methods["MAML from scratch"] = train("maml", "train", "omniglot_maml.yaml", args.scratch_steps)
    pre = train("pretrain", "pretrain", "omniglot_pretrain.yaml", args.pretrain_steps)
    methods["pretrain only (linear head on the support set)"] = pre
    init = f"model.init={pre['run_dir']}"
    methods["pretrain + Meta-SGD (all weights)"] = train("metasgd", "train", "omniglot_metasgd_pretrained.yaml",
                                                         args.meta_steps, init)
    methods["pretrain + MTL (frozen body; scale/shift learned)"] = train("mtl", "train", "omniglot_mtl.yaml",
                                                                       args.meta_steps, init)
    for name, m in methods.items():
        m["eval"] = {}
        for column, overrides in EVALS.items():
            cmd = [*cli, "eval", m["run_dir"], "--episodes", str(args.episodes), *overrides]
            log = Path(m["run_dir"]) / f"eval-{len(m['eval'])}.log"
            out = log.read_text() if args.reuse and log.is_file() else run(cmd, env, log)
            mean, half = (float(v) for v in ACC.search(out).groups())
            m["eval"][column] = {"acc_pct": mean, "ci95_pct": half, "command": " ".join(["mtl-ray", *cmd[3:]])}
            print(f"{name} | {column}: {mean:.2f}% ± {half:.2f}%", flush=True)
    results = {"episodes": args.episodes, "cpus": os.cpu_count(), "methods": methods}
    atomic_write(args.out, json.dumps(results, indent=2))
    atomic_write(args.doc, render(results, args))
    print(render(results, args))
    print(f"wrote {args.out} and {args.doc}")
    return 0


def render(results: dict, args: argparse.Namespace) -> str:
    cols = list(EVALS)
    head = "| method | training | " + " | ".join(cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for name, m in results["methods"].items():
        training = f"{m['steps']} steps, {m['train_s'] / 60:.1f} min"
        if "pretrain" in name and "only" not in name:
            training += " (+ pretraining)"
        cells = [f"{m['eval'][c]['acc_pct']:.1f}% ± {m['eval'][c]['ci95_pct']:.1f}%" for c in cols]
        lines.append(f"| {name} | {training} | " + " | ".join(cells) + " |")
    configs = [f"- {name}: `{m['config']}` with `{' '.join(m['overrides'])}`; run dir `{m['run_dir']}`"
               for name, m in results["methods"].items()]
    return "\n".join([
        "# Meta-transfer learning: results",
        "",
        "Generated by `python bench/transfer.py` (do not edit by hand). Mean accuracy ± 95% confidence interval "
        f"over {results['episodes']} test episodes per cell (15 queries per class), on a {results['cpus']}-core CPU. "
        "Every method was trained on Omniglot's minimal background splits only (training alphabets); "
        "the held-out alphabets (Korean, Tagalog) and scikit-learn's 8x8 digits (upsampled to 28x28) were "
        "never seen in training. Digits is the cross-domain target: UCI optdigits' 8x8 handwritten digits, "
        "numerals rather than alphabets' characters, at a far lower resolution.",
        "",
        *lines,
        "",
        "How each number was produced (`mtl-ray eval RUN_DIR --episodes N [overrides]`; the overrides per "
        "column: " + "; ".join(f"{c}: `{' '.join(o) or 'none'}`" for c, o in EVALS.items()) + "):",
        "",
        *configs,
        "",
        f"Budgets in steps (so load on the machine does not change the numbers): scratch MAML "
        f"{args.scratch_steps}; pretraining {args.pretrain_steps} steps of 128 images, then {args.meta_steps} "
        "steps of Meta-SGD or MTL on top of it; the training column gives the wall time each took here. "
        "Pretrain-only is the pretraining run scored with a zero-initialised linear head fine-tuned on each "
        "support set (pretrain.probe_steps full-batch steps of pretrain.probe_lr; Chen et al. 2019's Baseline).",
        "",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
