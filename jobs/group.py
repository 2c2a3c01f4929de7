"""Ray job entrypoint for `sift group`: the affinity fits and one local search per starting
partition run as Ray Tune trials on the cluster; --out must be on storage every node shares.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/group.py --data /mnt/shared/suite --grads /mnt/shared/grads \
        --out /mnt/shared/groups [--groups 3]
"""

import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main(["group", *sys.argv[1:]], own_process=True))
