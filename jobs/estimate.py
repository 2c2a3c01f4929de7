"""Ray job entrypoint for `sift estimate --calibrate`: its real LoRA fine-tunes run as parallel
Ray Tune trials on the cluster, and each trial rebuilds the anchor from the gradient store.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/estimate.py --calibrate --data /mnt/shared/suite --grads /mnt/shared/suite-grads \
        --target wordnet-animal-plant --out /mnt/shared/calibration
"""

import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main(["estimate", *sys.argv[1:]], own_process=True))
