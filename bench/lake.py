"""Lake's 20-way within-alphabet one-shot benchmark under a wall-clock training budget.

For each algorithm: ``mtl-ray train jobs/configs/omniglot_<alg>_lake.yaml optim.max_minutes=M`` on
Omniglot's minimal background splits, then ``mtl-ray eval <run> --lake`` on Lake's runs 01-10
(20 one-shot trials each, 200 in all), both through the real CLI in fresh processes. Prints the error
per algorithm with a 95% interval (binomial over the 200 trials) and the training steps reached.

For scale: the 2019 Omniglot-challenge report (Lake, Salakhutdinov, Tenenbaum) gives a prototypical
network about 30% error with the minimal splits; people make about 4.5%.

    python bench/lake.py                            # protonet and maml, 10 minutes each
    python bench/lake.py --algorithms protonet --minutes 5 --out bench/out/lake.json

Needs the data (``MTL_RAY_DATA_DIR`` or ``--data-dir``, default ../shared/data when it exists).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from mtl_ray.atomic import atomic_write

ROOT = Path(__file__).resolve().parents[1]
TRIALS = 200  # Lake's runs 01-10 x 20 query images


def run(cmd: list[str], env: dict[str, str], log: Path) -> str:
    """Run ``cmd``; tee stdout+stderr into ``log``; return the output (raises on failure)."""
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log.write_text(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}), log {log}:\n{proc.stdout[-3000:]}")
    return proc.stdout


def cli_and_env(data_dir: str | None) -> tuple[list[str], dict[str, str]]:
    """The ``mtl-ray`` command of this interpreter and an environment whose data root is ``data_dir`` (default
    ``$MTL_RAY_DATA_DIR``, else ../shared/data beside the repository)."""
    env = dict(os.environ)
    data_dir = data_dir or env.get("MTL_RAY_DATA_DIR") or str(ROOT.parent / "shared" / "data")
    env["MTL_RAY_DATA_DIR"] = str(Path(data_dir).resolve())
    return [sys.executable, "-m", "mtl_ray.cli"], env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algorithms", default="protonet,maml", help="comma-separated: protonet,maml")
    p.add_argument("--minutes", type=float, default=10.0, help="training budget per algorithm (default 10)")
    p.add_argument("--data-dir", default=None, help="data root (default $MTL_RAY_DATA_DIR or ../shared/data)")
    p.add_argument("--work-dir", type=Path, default=ROOT / "bench" / "out" / "lake", help="run directories")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("overrides", nargs="*", help="key=value overrides passed to every training run")
    args = p.parse_args(argv)

    cli, env = cli_and_env(args.data_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = {"minutes": args.minutes, "cpus": os.cpu_count(), "overrides": args.overrides, "runs": {}}
    for alg in [a.strip() for a in args.algorithms.split(",") if a.strip()]:
        config = ROOT / "jobs" / "configs" / f"omniglot_{alg}_lake.yaml"
        if not config.exists():
            raise SystemExit(f"--algorithms: got {alg!r}, expected one with a config "
                             "jobs/configs/omniglot_<alg>_lake.yaml")
        run_dir = args.work_dir / f"{alg}-{stamp}"
        run_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        out = run([*cli, "train", str(config), f"optim.max_minutes={args.minutes}", "tracking.progress=false",
                   *args.overrides, "--run-dir", str(run_dir)], env, run_dir / "train.log")
        train_s = time.perf_counter() - t0
        steps = int(re.search(r"steps: (\d+)", out).group(1))
        val = re.search(r"final meta-validation: (.*)", out).group(1)
        ev = run([*cli, "eval", str(run_dir), "--lake"], env, run_dir / "eval.log")
        err = float(re.search(r"error ([\d.]+)%", ev).group(1))
        q = err / 100
        half = 100 * 1.96 * math.sqrt(q * (1 - q) / TRIALS)
        results["runs"][alg] = {"error_pct": err, "ci95_pct": half, "steps": steps, "train_s": train_s,
                                "final_val": val, "run_dir": str(run_dir)}
        print(f"{alg}: Lake error {err:.1f}% ± {half:.1f}% after {steps} steps in {train_s / 60:.1f} min "
              f"(meta-val {val})", flush=True)
    print("\n=== Lake 20-way within-alphabet one-shot, runs 01-10 ===")
    for alg, r in results["runs"].items():
        print(f"  {alg:10s} error {r['error_pct']:5.1f}% ± {r['ci95_pct']:.1f}%  steps {r['steps']:6d}  "
              f"train {r['train_s'] / 60:.1f} min")
    if args.out is not None:
        atomic_write(args.out, json.dumps(results, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
