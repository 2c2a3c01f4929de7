"""`sift train-lora`: fit one LoRA (QLoRA with --qlora: the same code on a 4-bit base) on the
training rows of some tasks, with Ray Train's TorchTrainer (data parallel, gloo on CPU).

The loss is plain cross-entropy on the answer tokens (engine/features/objective.py; the clipped
answer score f of the estimator is a gradient feature, not a training loss); `objective: labels`
is the cross-entropy of the gold label among the task's labels, the class probability the
ensemble scores (its group adapters train with it); `objective: lm` instead adapts the model to
raw texts with the causal LM loss (the downstream check of pool selection). Every epoch is
evaluated on the tasks' validation rows, as the ensemble will use the adapter: accuracy is the
argmax over each task's labels of the first answer token's log-probability
(engine/ensemble/labels.py), averaged over tasks; the loss is the training loss. Each epoch is
checkpointed as a PEFT adapter (safetensors); the best epoch by validation accuracy (then loss)
is kept in OUT/adapter. A rerun with the same OUT resumes from the last checkpoint.

The workers get their rows and the starting adapter through Ray's object store, not as paths:
they run on any node, and the paths this process holds may exist on its node only (the
executor's cached copies of s3:// inputs; Ray Tune's trials get their data the same way).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from engine import executor, runtime, storage
from engine.config import LoraTrainConfig
from engine.data.ingest import examples_path
from engine.data.schema import label_sets
from engine.ensemble import labels as label_scores
from engine.errors import SiftError
from engine.features.grads import LabelTokens, anchor_model, encode_row
from engine.features import answers, objective
from engine.features.per_example import AnswerScore

ADAPTER = "adapter"
OPTIMIZER = "optimizer.pt"  # AdamW state in each checkpoint, restored with the adapter


def _rows(cfg: LoraTrainConfig) -> pl.DataFrame:
    """The rows of the configured tasks, every split."""
    path = examples_path(cfg.data)
    frame = storage.read_parquet(path)
    if cfg.tasks is not None:
        missing = sorted(set(cfg.tasks) - set(frame["task"].unique()))
        if missing:
            raise SiftError(f"task(s) {missing} not in {path}")
        frame = frame.filter(pl.col("task").is_in(cfg.tasks))
    return frame


def _split(frame: pl.DataFrame, split: str) -> pl.DataFrame:
    return frame.filter(pl.col("split").fill_null("train") == split)


def _folder_files(folder: str | Path) -> dict[str, bytes]:
    """The files of a (flat) adapter folder, local or remote, by name."""
    local = storage.local_copy(folder)
    return {f.name: f.read_bytes() for f in sorted(local.iterdir()) if f.is_file()}


@dataclass
class LabelRows:
    """Validation rows of one task, scored over the task's labels: the prompts (the encoded
    row without its answer), the first token of each label's answer, the gold label's index."""

    prompts: list[list[int]]
    token_ids: list[int]
    gold: np.ndarray


def label_rows(tokenizer, cfg: LoraTrainConfig, frame: pl.DataFrame, choices: dict[str, list[str]]) -> list[LabelRows]:
    """Per task of `frame` whose labels differ in their first answer token, its rows for the
    label-set accuracy (tasks whose labels cannot be told apart that way are left out)."""
    out = []
    for task in sorted(set(frame["task"].drop_nulls())):
        try:
            token_ids = label_scores.label_token_ids(tokenizer, cfg.answer, choices[task])
        except SiftError:
            continue
        prompts, gold = [], []
        for row in frame.filter(pl.col("task") == task).iter_rows(named=True):
            encoded = encode_row(tokenizer, cfg, row)
            if not isinstance(encoded, str) and row["label"] in choices[task]:
                prompts.append(encoded[0][:encoded[1]])
                gold.append(choices[task].index(row["label"]))
        if prompts:
            out.append(LabelRows(prompts, token_ids, np.array(gold)))
    return out


def label_accuracy(model, rows: list[LabelRows], pad: int, batch: int = 32) -> float:
    """The mean over tasks of the share of rows whose gold label has the highest first-token
    log-probability among the task's labels; NaN without such rows."""
    if not rows:
        return float("nan")
    accuracy = []
    for task in rows:
        logp = torch.cat([label_scores.next_token_logprobs(model, task.prompts[i:i + batch], task.token_ids, pad)
                          for i in range(0, len(task.prompts), batch)])
        accuracy.append(float((logp.argmax(-1).numpy() == task.gold).mean()))
    return float(np.mean(accuracy))


def _evaluate(score: AnswerScore, encoded: list, labelled: list[LabelRows], pad: int, kind: str,
              batch: int = 32) -> dict:
    """Validation loss (the training loss) and, for answers, the label-set accuracy."""
    if not encoded:
        return {"val_loss": float("nan"), "val_accuracy": float("nan")}
    with torch.no_grad():
        batches = [objective.collate(encoded[i:i + batch], pad, kind) for i in range(0, len(encoded), batch)]
        total = sum(float(objective.loss(score, b, kind)) * len(b) for b in batches)
    accuracy = label_accuracy(score.model, labelled, pad, batch) if kind != "lm" else float("nan")
    return {"val_loss": total / len(encoded), "val_accuracy": accuracy}


def _encode(tokenizer, cfg: LoraTrainConfig, frame: pl.DataFrame, choices: dict[str, list[str]]) -> list:
    """The rows as the objective trains on them (objective.collate's kinds); rows that do not
    fit are left out."""
    if cfg.objective == "labels":
        return _encode_choices(tokenizer, cfg, frame, choices)
    rows = frame.iter_rows(named=True)
    encoded = (answers.encode_text(tokenizer, r["text"], cfg.max_length) if cfg.objective == "lm"
               else encode_row(tokenizer, cfg, r) for r in rows)
    return [e for e in encoded if not isinstance(e, str)]


def _encode_choices(tokenizer, cfg: LoraTrainConfig, frame: pl.DataFrame,
                    choices: dict[str, list[str]]) -> list[objective.Choice]:
    """Per labelled row, its prompt as the ensemble builds it and its task's label tokens, the
    gold one first (`LabelTokens.encode`, as a labels-objective gradient store encodes it)."""
    try:
        labels = LabelTokens.of(tokenizer, cfg.answer, {t: choices[t] for t in set(frame["task"].drop_nulls())})
    except SiftError as exc:
        raise SiftError(f"{exc}; train it with objective=answer") from None
    encoded = (labels.encode(tokenizer, cfg, row) for row in frame.iter_rows(named=True))
    return [e for e in encoded if not isinstance(e, str)]


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker, on any node: its rows (`rows`) and starting adapter's files
    (`adapter`, or None) come from the object store."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = LoraTrainConfig.model_validate(config["cfg"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(cfg.seed + rank)
    with tempfile.TemporaryDirectory() as folder:  # the starting adapter, for PEFT, which reads from disk
        adapter = None
        if config["adapter"] is not None:
            adapter = folder
            for name, content in ray.get(config["adapter"]).items():
                (Path(folder) / name).write_bytes(content)
        tokenizer, model = anchor_model(cfg.model_copy(update={"adapter": adapter}))
    if cfg.quantize == "none":  # a 4-bit base is placed on the GPU as it loads
        model = model.to(ray.train.torch.get_device())
    start_epoch, optimizer_state = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(model, load_file(str(Path(folder) / ADAPTER / "adapter_model.safetensors")))
            start_epoch = json.loads((Path(folder) / "state.json").read_text())["epoch"] + 1
            if (Path(folder) / OPTIMIZER).is_file():
                optimizer_state = torch.load(Path(folder) / OPTIMIZER, map_location=ray.train.torch.get_device(),
                                             weights_only=True)
    score = AnswerScore(model)
    frame = ray.get(config["rows"])
    choices = label_sets(frame)
    every = _encode(tokenizer, cfg, _split(frame, "train"), choices)
    if not every:
        raise SiftError(f"no training row of tasks {cfg.tasks or 'all'} can be encoded (no label, or an answer "
                        f"longer than max_length {cfg.max_length})")
    train = every[rank::world]
    validation_rows = _split(frame, "validation")
    validation = _encode(tokenizer, cfg, validation_rows, choices)
    labelled = label_rows(tokenizer, cfg, validation_rows, choices) if cfg.objective != "lm" else []
    trained = ray.train.torch.prepare_model(score) if world > 1 else score
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    if optimizer_state is not None:  # AdamW's moments too: a resumed run continues as an uninterrupted one would
        optimizer.load_state_dict(optimizer_state)
    # Every rank takes the same number of steps (DDP all-reduces each one), from the global count.
    steps = cfg.steps_per_epoch or max(1, len(every) // (cfg.batch_size * world))
    pad = tokenizer.pad_token_id
    for epoch in range(start_epoch, cfg.epochs):
        rng = np.random.default_rng(cfg.seed * 1000 + epoch * 17 + rank)
        model.train()
        losses = objective.train_steps(trained, optimizer, train, steps, cfg.batch_size, pad, rng, cfg.objective)
        model.eval()
        # start_epoch: where this attempt began (above 0 after a restart from a checkpoint)
        metrics = {"epoch": epoch, "start_epoch": start_epoch, "train_loss": float(np.mean(losses)),
                   **_evaluate(score, validation, labelled, pad, cfg.objective)}
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                model.save_pretrained(str(Path(folder) / ADAPTER))
                torch.save(optimizer.state_dict(), Path(folder) / OPTIMIZER)
                (Path(folder) / "state.json").write_text(json.dumps(metrics))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 else None)


def _fingerprint(cfg: LoraTrainConfig) -> str:
    """Runs resume only when what they train is the same (more epochs or workers may change);
    named by the executor's digest, with the data file's stamp: rewritten data is new work."""
    return executor.digest(cfg.model_dump(mode="json", exclude={"epochs", "workers", "runtime", "out"}),
                           storage.stamp(examples_path(cfg.data)))


def scaling_config(workers: int, gpus_per_worker: float, cpus_now: float):
    """Ray Train's workers. With GPUs per worker, every worker asks for them whether or not the
    cluster has any now (an autoscaler starts GPU nodes from zero); on CPUs, at most one worker
    per CPU present, one CPU each."""
    from ray.train import ScalingConfig

    if not gpus_per_worker:
        workers = min(workers, max(1, int(cpus_now)))
    return ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0,
                         resources_per_worker={"CPU": 1, **({"GPU": gpus_per_worker} if gpus_per_worker else {})})


def train_lora(cfg: LoraTrainConfig) -> dict:
    if cfg.data is None or cfg.out is None or cfg.model is None:
        raise SiftError("train-lora needs --data, --model and --out")
    frame = _rows(cfg)
    if not _split(frame, "train").height:
        raise SiftError(f"no training rows for tasks {cfg.tasks or 'all'} in {cfg.data}")
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    # Absolute: the fingerprint (and so the resumed Ray Train run) does not depend on the directory.
    cfg = cfg.model_copy(update={"data": storage.absolute(cfg.data),
                                 "adapter": storage.absolute(cfg.adapter) if cfg.adapter else None})
    info = runtime.start(cfg.runtime)
    out = Path(cfg.out).resolve()
    finished = out / "train.json"
    if finished.is_file():  # a finished run of the same training: nothing to do
        previous = json.loads(finished.read_text())
        if previous.get("fingerprint") == _fingerprint(cfg) and previous["config"]["epochs"] == cfg.epochs:
            return previous
    scaling = scaling_config(cfg.workers, cfg.gpus_per_worker, info.cpus)
    if cfg.gpus_per_worker and info.gpus < cfg.gpus_per_worker * scaling.num_workers:
        print(f"train-lora: waiting for {cfg.gpus_per_worker * scaling.num_workers:g} GPUs "
              f"(the cluster has {info.gpus:g} now)")
    workers = scaling.num_workers
    # Checkpoints where every node reads them: a worker group restarted after a lost node (up to
    # max_failures times) resumes from the last epoch's checkpoint, on whichever node it lands.
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "rows": ray.put(frame),
                           "adapter": ray.put(_folder_files(cfg.adapter)) if cfg.adapter else None},
        scaling_config=scaling,
        run_config=RunConfig(name=f"train-lora-{_fingerprint(cfg)}",
                             **runtime.run_storage(cfg.runtime, out, "ray").run_config_kwargs(),
                             failure_config=FailureConfig(max_failures=cfg.runtime.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.epochs)),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray Train v2 raises the workers' error from fit()
        raise SiftError(f"training failed: {str(exc).strip().splitlines()[-1][:300]}") from None
    history = []
    best = None
    def rank(metrics: dict) -> tuple:  # validation accuracy first (answer), then loss; else the latest
        accuracy, loss = metrics["val_accuracy"], metrics["val_loss"]
        return (-accuracy if accuracy == accuracy else 0.0, loss if loss == loss else 0.0, -metrics["epoch"])

    for checkpoint, metrics in result.best_checkpoints:
        history.append(metrics)
        if best is None or rank(metrics) < rank(best[1]):
            best = (checkpoint, metrics)
    if best is None:
        raise SiftError("training reported no checkpoint")
    with best[0].as_directory() as folder:
        shutil.rmtree(out / ADAPTER, ignore_errors=True)
        shutil.copytree(Path(folder) / ADAPTER, out / ADAPTER)
    report = {"best": best[1], "history": sorted(history, key=lambda m: m["epoch"]), "adapter": str(out / ADAPTER),
              "workers": workers, "fingerprint": _fingerprint(cfg), "config": cfg.model_dump(mode="json")}
    (out / "train.json").write_text(json.dumps(report, indent=2))
    return report
