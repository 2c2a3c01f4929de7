"""Ray job entrypoint for `sift featurize embed|grads` (the kind is the first argument): the
actor pool is sized from the cluster's resources, one actor per GPU when it has GPUs.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/featurize.py grads --data /mnt/shared/suite --out /mnt/shared/suite-grads \
        --model smollm2-135m --dim 400

Every actor writes its shards into --out itself, so --out must be storage every node shares.
"""

import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main(["featurize", *sys.argv[1:]], own_process=True))
