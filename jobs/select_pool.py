"""Ray job entrypoint for GOT-D pool selection: the same config as `sift select-pool`.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/select_pool.py --config configs/select_pool.yaml --set budget=50000

On a cluster the job's driver connects to it (RAY_ADDRESS is set by `ray job submit`); paths
in the config must be on storage every node can read.
"""

import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main(["select-pool", *sys.argv[1:]]))
