"""`sift featurize grads`: per-example LoRA gradients of a causal LM, projected, into a feature store."""

from __future__ import annotations

from engine.config import GradsConfig
from engine.stages import Stage, split
from engine.stages.features import FeaturesResult, featurize_arguments, show


def run(cfg: GradsConfig) -> FeaturesResult:
    from engine.features.grads import featurize_grads

    return FeaturesResult.of(*featurize_grads(cfg))


def arguments(p) -> None:
    featurize_arguments(p)
    p.add_argument("--adapter", help="a PEFT adapter folder as the anchor (default: fresh seeded LoRA)")
    p.add_argument("--dim", type=int, help="projection dimension (default 400)")
    p.add_argument("--layers", dest="lora.layers", type=lambda s: [int(x) for x in split(s)],
                   help="comma-separated layers that get LoRA (backprop stops at the lowest)")
    p.add_argument("--qlora", dest="quantize", action="store_const", const="nf4", help="4-bit nf4 base")


STAGE = Stage("grads", "per-example LoRA gradients of a causal LM, projected to --dim", GradsConfig, FeaturesResult,
              run, show, arguments, inputs=("data", "model", "adapter"), command=("featurize", "grads"),
              ignore=("batch_size", "actors", "min_actors", "gpus_per_actor", "shard_rows", "replace_mismatch",
                      "method", "projection_cache_mb"), native_storage=True, replace_stale=True)
