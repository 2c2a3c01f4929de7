"""Which loss teaches a group adapter its tasks in a few CPU steps (issue 14, defect 6). Prints JSON lines.

    python jobs/bench/adapter_objective.py                       # the demo's group-0, after `make demo`
    python jobs/bench/adapter_objective.py --tasks tweet-polarity --variants answer:1e-3,labels:3e-3 --steps 12 --every 3

In process (no Ray), from the demo's gradient store's anchor (runs/demo/grads: SmolLM2-135M, LoRA
on its top 4 layers) on the demo's suite: for each variant `objective:lr` (answer: CE on the
answer tokens; labels: CE of the gold label among the task's labels), `steps` AdamW steps on
random batches of the tasks' training rows, and every `every` steps the mean training loss and
each task's label-set accuracy and NLL on its held-out rows (validation + test), beside the base
model's (the anchor: a fresh LoRA computes the base exactly).
"""
import argparse
import json
import time

import numpy as np
import polars as pl
import torch

from engine.config import GradsConfig
from engine.features.grads import anchor_model, encode_row
from engine.features import answers, objective
from engine.features.per_example import AnswerScore
from engine.ensemble import labels as L

p = argparse.ArgumentParser()
p.add_argument("--grads", default="runs/demo/grads")
p.add_argument("--data", default="runs/demo/suite/examples.parquet")
p.add_argument("--tasks", default="fortunes-computers-science,fortunes-law-politics,wordnet-animal-plant,wordnet-person-location")
p.add_argument("--variants", default="answer:1e-3,labels:1e-3")
p.add_argument("--steps", type=int, default=24)
p.add_argument("--every", type=int, default=6)
p.add_argument("--batch", type=int, default=16)
a = p.parse_args()
torch.set_num_threads(2)
cfg = GradsConfig.model_validate_json(open(f"{a.grads}/config.json").read())
tasks = a.tasks.split(",")
frame = pl.read_parquet(a.data).filter(pl.col("task").is_in(tasks))
choices = {t: sorted(frame.filter(pl.col("task") == t)["label"].unique().to_list()) for t in tasks}


def rows(tok, split):
    out = []
    for r in frame.filter(pl.col("split") == split).iter_rows(named=True):
        ids, start = encode_row(tok, cfg, r)
        out.append((ids, start, r["task"], choices[r["task"]].index(r["label"])))
    return out


def evaluate(model, tok, held, token_ids):
    res = {}
    for t in tasks:
        part = [h for h in held if h[2] == t]
        logp = L.next_token_logprobs(model, [h[0][:h[1]] for h in part], token_ids[t], tok.pad_token_id)
        lp = logp.log_softmax(-1)
        gold = torch.tensor([h[3] for h in part])
        res[t] = (float((lp.argmax(-1) == gold).float().mean()), float(-lp[torch.arange(len(gold)), gold].mean()))
    return res


def as_choice(h, token_ids):
    """objective.Choice of a row: its prompt, its task's label tokens with the gold one first."""
    ids = token_ids[h[2]]
    return h[0][:h[1]], [ids[h[3]], *ids[:h[3]], *ids[h[3] + 1:]]


results = {}
for variant in a.variants.split(","):
    kind, lr = variant.split(":")
    lr = float(lr)
    tok, model = anchor_model(cfg)
    score = AnswerScore(model)
    token_ids = {t: L.label_token_ids(tok, cfg.answer, choices[t]) for t in tasks}
    train, held = rows(tok, "train"), rows(tok, "validation") + rows(tok, "test")
    curve = []
    model.eval()
    with torch.no_grad():
        base = evaluate(model, tok, held, token_ids) if not results else results[next(iter(results))]["base"]
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter(); losses = []
    for step in range(1, a.steps + 1):
        model.train()
        batch = [train[i] for i in rng.choice(len(train), size=min(a.batch, len(train)), replace=False)]
        if kind == "answer":
            loss = objective.loss(score, answers.collate([(h[0], h[1]) for h in batch], tok.pad_token_id))
        else:
            loss = objective.loss(score, objective.collate([as_choice(h, token_ids) for h in batch], tok.pad_token_id,
                                                            "labels"), "labels")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step % a.every == 0:
            model.eval()
            ev = evaluate(model, tok, held, token_ids)
            curve.append({"step": step, "loss": float(np.mean(losses[-a.every:])), "s": round(time.perf_counter() - t0, 1),
                          "acc": round(float(np.mean([v[0] for v in ev.values()])), 3),
                          "nll": round(float(np.mean([v[1] for v in ev.values()])), 3),
                          "per_task": {t: [round(v[0], 3), round(v[1], 3)] for t, v in ev.items()}})
            print(variant, json.dumps(curve[-1]), flush=True)
    results[variant] = {"base": base, "curve": curve}
    print(variant, "base", json.dumps({"acc": round(float(np.mean([v[0] for v in base.values()])), 3),
                                       "nll": round(float(np.mean([v[1] for v in base.values()])), 3),
                                       "per_task": base}), flush=True)
