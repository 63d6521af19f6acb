"""Meta-training job for ``ray job submit``: ``mtl-ray train`` with the same arguments.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/meta_train.py jobs/configs/omniglot_maml.yaml scaling.num_workers=4 --run-dir /shared/runs/maml

The job's working directory is a throw-away copy: give ``--run-dir`` an absolute path on shared storage (or
``tracking.checkpoint_uri`` a ``pyarrow.fs`` URI), and ``data.root`` the data's path on the cluster. README
("Run on a Ray cluster") shows how to start the head so the job runs in the project's environment.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package submitted with --working-dir

from mtl_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(command="train", prog="python jobs/meta_train.py"))
