"""Ray job entrypoint for the first-order estimator's task selection: the same config as
`sift select-tasks` (`--search tune` runs its Ray Tune trials on the cluster).

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/select_tasks.py --data /mnt/shared/suite --grads /mnt/shared/suite-grads \
        --target wordnet-animal-plant --out /mnt/shared/select-tasks --search tune --subsets 500
"""

import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main(["select-tasks", *sys.argv[1:]], own_process=True))
