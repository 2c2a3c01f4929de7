"""Ray job entrypoint for `sift run`: the whole pipeline on the cluster. Set `out` (and any input
paths) in the pipeline file to storage every node shares.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/pipeline.py configs/pipeline.yaml --set out=/mnt/shared/pipeline
"""

import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]], own_process=True))
