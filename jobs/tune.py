"""Hyperparameter sweep job for ``ray job submit`` (thin: parse -> build -> run -> close).

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/tune.py --sweep jobs/configs/sweep_omniglot_maml.yaml --sweep-dir /shared/sweeps/maml1

Every trial reserves its own placement group (trial process + its worker actors). The sweep file,
every value of its search space and the data are validated before anything starts; a bad one exits 2
with every problem listed. ``--resume`` continues an interrupted sweep in ``--sweep-dir``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run the package submitted with --working-dir (this file's repository), not whatever else is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtl_ray.cli import EXIT_CONFIG, tune_command
from mtl_ray.config import UserError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="mtl-ray sweep job")
    p.add_argument("--sweep", required=True, help="sweep YAML, e.g. jobs/configs/sweep_omniglot_maml.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the base config")
    p.add_argument("--sweep-dir", help="sweep directory (default: <tracking.run_dir>/<sweep>-<time>)")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    try:
        tune_command(args.sweep, args.overrides, args.sweep_dir, resume=args.resume)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    return 0


if __name__ == "__main__":
    sys.exit(main())
