"""Ray job entrypoint for `sift ingest`: the files are read in parallel by Ray Data tasks on the
cluster's nodes, so each input must be readable from every node (a shared mount or a URI).

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/ingest.py s3://bucket/raw/ --out /mnt/shared/ingest
"""

import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]], own_process=True))
