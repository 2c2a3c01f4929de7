"""Ray job entrypoint for `sift train`: one Ray Train run per group, as many at once as the
cluster has CPUs (or GPUs) for their workers; adapters and ensemble.json go to shared --out.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train.py --groups /mnt/shared/groups --out /mnt/shared/ensemble \
        [--qlora] [--boost 3] --set workers=2
"""

import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]], own_process=True))
