"""Featurization benchmark: per-example gradient methods side by side, projection cost, embedding
throughput with 1 vs 2 Ray actors, peak memory. Prints one JSON object.

    python jobs/bench/featurize.py                       # tiny-llama and smollm2-135m, batch 8, 128 tokens
    python jobs/bench/featurize.py --models tiny-llama --repeats 5

Every method runs on the same batch in the same process; figures are medians over --repeats
timed runs after one warm-up. The limit is a plain batched forward + backward (no per-example
gradients at all); targets: hooks >= 0.9x the limit's ex/s, >= 1.5x vmap; projection <= 10%.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from engine import runtime
from engine.config import EmbedConfig, IngestConfig, LoraSpec
from engine.data import corpora
from engine.data.ingest import ingest
from engine.features import answers
from engine.features.embed import embed
from engine.features.per_example import METHODS, AnswerScore
from engine.features.projection import Projector
from engine.models import builtin, load, lora


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _batch(tok, size: int, length: int):
    """`size` real wordnet glosses, each cut or repeated to exactly `length` tokens with a 1-token answer."""
    glosses = corpora.load("wordnet").sample(size, seed=0)
    examples = []
    for text, label in glosses.select("text", "label").iter_rows():
        ids = tok(text)["input_ids"]
        ids = (ids * (length // max(len(ids), 1) + 1))[: length - 1]
        answer = tok(" " + label.split(".")[0], add_special_tokens=False)["input_ids"][:1]
        examples.append((ids + answer, length - 1))
    return answers.collate(examples, tok.pad_token_id)


def bench_grads(model_name: str, batch_size: int, length: int, repeats: int, dim: int,
                top_layers: int | None = None) -> dict:
    """All methods with LoRA on every layer; with `top_layers`, only the last N layers get LoRA
    (backprop then stops N layers down: the saving the `layers` option buys)."""
    path = builtin.resolve(model_name)
    tok = load.load_tokenizer(path)
    base = load.load_causal_lm(path)
    layers = None
    if top_layers:
        depth = base.config.num_hidden_layers
        layers = list(range(depth - top_layers, depth))
    model = lora.add_lora(base, LoraSpec(r=8, layers=layers)).eval()
    score = AnswerScore(model)
    batch = _batch(tok, batch_size, length)
    params = [p for p in model.parameters() if p.requires_grad]

    def plain():
        score(*batch.tensors()).sum().backward()
        for p in params:
            p.grad = None

    seconds = {"plain": _median_seconds(plain, repeats)}
    for name, method in METHODS.items():
        seconds[name] = _median_seconds(lambda: method(score, batch), repeats)
    _, grads = METHODS["hooks"](score, batch)
    projector = Projector({n: g.shape[1] for n, g in grads.items()}, dim, seed=0)
    seconds["projection"] = _median_seconds(lambda: projector.project(grads), repeats)
    ex_s = {k: batch_size / v for k, v in seconds.items() if k != "projection"}
    return {
        "model": model_name,
        "lora_layers": "all" if layers is None else layers,
        "batch": batch_size,
        "tokens": length,
        "lora_params": projector.total,
        "dim": dim,
        "ex_per_s": {k: round(v, 2) for k, v in ex_s.items()},
        "hooks_vs_plain": round(ex_s["hooks"] / ex_s["plain"], 3),
        "hooks_vs_vmap": round(ex_s["hooks"] / ex_s["vmap"], 3),
        "hooks_vs_loop": round(ex_s["hooks"] / ex_s["loop"], 3),
        "projection_share_of_hooks": round(seconds["projection"] / seconds["hooks"], 4),
    }


def bench_embed(rows: int, actor_counts: list[int]) -> dict:
    out: dict = {"rows": rows, "model": "minilm"}
    with tempfile.TemporaryDirectory() as tmp:
        pool = Path(tmp) / "pool.parquet"
        corpora.load("wordnet").sample(rows, seed=1).write_parquet(pool)
        ingest(IngestConfig(inputs=[str(pool)], out=Path(tmp) / "ingest"))
        for actors in actor_counts:
            cfg = EmbedConfig(data=Path(tmp) / "ingest", out=Path(tmp) / f"emb{actors}", actors=actors,
                              shard_rows=max(256, rows // 16))
            _, stats = embed(cfg)
            out[f"actors_{actors}_ex_per_s"] = round(stats.rows_per_s, 1)
    if len(actor_counts) == 2:
        a, b = actor_counts
        out[f"ratio_{b}_vs_{a}"] = round(out[f"actors_{b}_ex_per_s"] / out[f"actors_{a}_ex_per_s"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-llama,smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--dim", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--embed-rows", type=int, default=4000)
    parser.add_argument("--actors", default="1,2")
    parser.add_argument("--top-layers", type=int, default=4, help="also time LoRA on only the last N layers (0: skip)")
    args = parser.parse_args()

    info = runtime.start()
    result = {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "ray_cpus": info.cpus,
        "grads": [bench_grads(m, args.batch, args.tokens, args.repeats, args.dim, top)
                  for m in args.models.split(",") for top in ([None, args.top_layers] if args.top_layers else [None])],
        "embed": bench_embed(args.embed_rows, [int(a) for a in args.actors.split(",")]),
        "peak_rss_mb_driver": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
