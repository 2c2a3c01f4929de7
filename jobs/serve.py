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
"""

import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
