"""Hyperparameter sweep job for ``ray job submit``: ``mtl-ray tune`` with the same arguments.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/tune.py jobs/configs/sweep_omniglot_maml.yaml --sweep-dir /shared/sweeps/maml1

Every trial reserves its own placement group (trial process + its worker actors); ``--resume``
continues an interrupted sweep in ``--sweep-dir``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package submitted with --working-dir

from mtl_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(command="tune", prog="python jobs/tune.py"))
