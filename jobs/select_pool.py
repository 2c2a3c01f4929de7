"""Ray job entrypoint for GOT-D pool selection: the same config as `sift select-pool`.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/select_pool.py --config configs/select_pool.yaml --pool /mnt/shared/ingest \
        --target /mnt/shared/target.jsonl --out /mnt/shared/select-pool --set budget=50000

On a cluster the job's driver connects to it (RAY_ADDRESS is set by `ray job submit`). The
config file travels with the working dir, but the job runs in a temporary copy of it: data paths
must be absolute and on storage every node can read, or outputs land in that copy and vanish.
"""

import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main(["select-pool", *sys.argv[1:]], own_process=True))
