"""Pretraining job for ``ray job submit``: ``mtl-ray pretrain`` with the same arguments.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/pretrain.py jobs/configs/omniglot_pretrain.yaml pretrain.num_workers=4 \
        --run-dir /shared/runs/omniglot_pretrain

Then meta-learn from it with ``model.init=/shared/runs/omniglot_pretrain`` (jobs/meta_train.py). As for
every job, give the run directory and ``data.root`` absolute paths the cluster's nodes can read.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package submitted with --working-dir

from mtl_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(command="pretrain", prog="python jobs/pretrain.py"))
