"""Pretraining job for ``ray job submit`` (thin: parse -> validate -> Ray Train -> records).

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/pretrain.py --config jobs/configs/omniglot_pretrain.yaml pretrain.num_workers=4 \\
        --run-dir /shared/runs/omniglot_pretrain

Then meta-learn from it with ``model.init=/shared/runs/omniglot_pretrain`` (jobs/meta_train.py). Give
the run directory an absolute path on shared storage: the job's working directory is a throw-away copy.
The whole config is validated before anything starts; a bad one exits 2 with every problem listed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run the package submitted with --working-dir (this file's repository), not whatever else is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtl_ray.cli import EXIT_CONFIG, OVERWRITE_HELP, pretrain, run_dir_for, validate_pretrain
from mtl_ray.config import UserError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="mtl-ray pretraining job (Ray Train)")
    p.add_argument("--config", required=True, help="YAML config, e.g. jobs/configs/omniglot_pretrain.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. pretrain.num_workers=4")
    p.add_argument("--run-dir", help="run directory (default: tracking.run_dir/<name or run_name>)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --run-dir")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    args = p.parse_args(argv)
    try:
        cfg = validate_pretrain(args.config, args.overrides)  # every config/data problem, before Ray starts
        pretrain(cfg, run_dir_for(cfg, args.run_dir), resume=args.resume, overwrite=args.overwrite)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    return 0


if __name__ == "__main__":
    sys.exit(main())
