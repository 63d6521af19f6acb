"""Meta-transfer pipeline job for ``ray job submit``: ``mtl-ray pipeline`` with the same arguments.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/pipeline.py jobs/configs/pipeline_omniglot.yaml --run-dir /shared/runs/pmf

Pretraining runs on Ray Train, meta-training on the config's worker actors and every deployment-search trial on
an actor of its own, all on the cluster the job was submitted to; ``--resume`` continues an interrupted pipeline.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package submitted with --working-dir

from mtl_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(command="pipeline", prog="python jobs/pipeline.py"))
