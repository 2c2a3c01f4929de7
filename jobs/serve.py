"""Ray job entrypoint: serve an adapter ensemble on a cluster with Ray Serve, the same app and
flags as `sift serve` (vLLM multi-LoRA replicas get one GPU each when the cluster has GPUs).

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/serve.py /shared/ensemble --backend vllm --host 0.0.0.0 --port 8000 \
        --set replicas=2 --detach

The manifest and its adapters must be on storage every node can read. Without --detach the job
stays up (and so does the app) until it is stopped; with --detach it deploys and returns, and the
app keeps running on the cluster's Serve until `serve shutdown`. The default host is 127.0.0.1:
pass --host 0.0.0.0 to reach the HTTP proxies from outside the nodes, behind your own network
controls.

Swaps (POST /v1/ensemble) stay off unless `--set allow_swap=true --set manifest_root=/shared/ensembles`
(a folder on shared storage: replicas write the chosen manifest under it) and the job's driver
has SIFT_SERVE_TOKEN, e.g. `--runtime-env-json '{"env_vars": {"SIFT_SERVE_TOKEN": "..."}}'`
(readable by whoever can list the cluster's jobs); the replicas get only its SHA-256.
"""

import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]], own_process=True))
