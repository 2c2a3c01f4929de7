"""Ray job entrypoint for `sift train-lora`: Ray Train's data-parallel workers run on the
cluster, and their per-epoch checkpoints go to --out, which every node must share.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train_lora.py --data /mnt/shared/suite --model smollm2-135m \
        --out /mnt/shared/lora-meta --workers 4
"""

import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-lora", *sys.argv[1:]], own_process=True))
