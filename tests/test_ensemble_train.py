"""suite -> gradients -> sift group -> sift train (Ray Train, weights, boosting) -> sift evaluate,
through the real commands on the tiny Llama; and the bad inputs of grouping and training."""

from __future__ import annotations

import json

import polars as pl
import pytest

from engine.cli import main
from engine.config import EnsembleTrainConfig
from engine.ensemble import manifest
from engine.errors import SiftError
from engine.train.ensemble import _check, train_ensemble

TASKS = "[wordnet-animal-plant, fortunes-law-politics, wordnet-person-location]"


@pytest.fixture(scope="module")
def suite_grads(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("ens")
    assert main(["suite", "--out", str(root / "suite"), "--per-task", "40", "--set", f"tasks={TASKS}",
                 "--set", "test=0.2"]) == 0
    assert main(["featurize", "grads", "--data", str(root / "suite"), "--out", str(root / "grads"),
                 "--model", "tiny-llama", "--dim", "32"]) == 0
    return root


def test_group_train_evaluate_end_to_end(suite_grads, tmp_path, capsys):
    root = suite_grads
    assert main(["group", "--data", str(root / "suite"), "--grads", str(root / "grads"), "--groups", "2",
                 "--out", str(tmp_path / "group"), "--set", "subsets=20", "--set", "restarts=1",
                 "--set", "rounds=5"]) == 0
    grouping = json.loads((tmp_path / "group" / "groups.json").read_text())
    assert grouping["m"] == 2 and sorted(t for g in grouping["groups"] for t in g) == sorted(grouping["tasks"])
    assert {c["start"] for c in grouping["candidates"]} == {"sdp", "spectral", "random-0"}
    assert all(c["objective"] <= c["start_objective"] + 1e-12 for c in grouping["candidates"])
    assert (tmp_path / "group" / "affinity.png").stat().st_size > 10_000

    args = ["train", "--groups", str(tmp_path / "group"), "--out", str(tmp_path / "ens"), "--epochs", "1",
            "--boost", "1", "--set", "steps_per_epoch=2"]
    assert main(args) == 0
    loaded = manifest.load(tmp_path / "ens")
    assert [a.name for a in loaded.adapters][:2] == ["group-0", "group-1"]
    for task, entry in loaded.tasks.items():
        assert sum(entry.weights.values()) == pytest.approx(1)
    report = json.loads((tmp_path / "ens" / "report.json").read_text())
    assert set(report["test"]["tasks"]) == set(grouping["tasks"]) and report["test"]["tasks"]["wordnet-animal-plant"][
        "ensemble"]["rows"] == 8
    assert len(report["boosting"]) == 1
    assert report["boosting"][0]["accepted"] == (loaded.adapters[-1].name == "boost-1")
    assert {"gradient_pass", "estimator", "training", "inference_per_query"} <= set(loaded.flops)
    assert all(v > 0 for k, v in loaded.flops.items() if k != "boosting")

    # A rerun finds every group trained and only refits the weights.
    trained = (tmp_path / "ens" / "runs" / "group-0" / "train.json").stat().st_mtime_ns
    assert main(args) == 0
    assert (tmp_path / "ens" / "runs" / "group-0" / "train.json").stat().st_mtime_ns == trained

    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "ens"), "--data", str(root / "suite")]) == 0
    assert "Ensemble on test rows" in capsys.readouterr().out
    assert json.loads((tmp_path / "ens" / "evaluation-test.json").read_text())["average"] == report["test"]["average"]


def test_qlora_ensemble(suite_grads, tmp_path):
    root = suite_grads
    report = train_ensemble(EnsembleTrainConfig(
        partition=[["wordnet-animal-plant", "fortunes-law-politics", "wordnet-person-location"]],
        data=root / "suite", grads=root / "grads", out=tmp_path / "q", quantize="nf4", epochs=1, steps_per_epoch=1))
    assert manifest.load(tmp_path / "q").quantize == "nf4"
    assert report["validation"]["average"]["accuracy"] >= 0


@pytest.mark.parametrize("partition, message", [
    ([["wordnet-animal-plant"], ["fortunes-law-politics"]], "task\\(s\\) \\['wordnet-person-location'\\] are in no group"),
    ([["wordnet-animal-plant", "nope"], ["fortunes-law-politics", "wordnet-person-location"]],
     "task\\(s\\) \\['nope'\\] of the groups are not in the data"),
    ([["wordnet-animal-plant", "fortunes-law-politics"], ["fortunes-law-politics", "wordnet-person-location"]],
     "are in more than one group"),
    ([[], ["wordnet-animal-plant", "fortunes-law-politics", "wordnet-person-location"]], "a group holds no task"),
])
def test_bad_partitions(suite_grads, partition, message):
    frame = pl.read_parquet(suite_grads / "suite" / "examples.parquet")
    with pytest.raises(SiftError, match=message):
        _check(partition, frame)


def test_group_without_training_rows_and_too_many_groups(suite_grads, tmp_path, capsys):
    frame = pl.read_parquet(suite_grads / "suite" / "examples.parquet").with_columns(
        split=pl.when(pl.col("task") == "wordnet-person-location").then(pl.lit("validation")).otherwise("split"))
    with pytest.raises(SiftError, match="group 1 \\(wordnet-person-location\\) has no training rows"):
        _check([["wordnet-animal-plant", "fortunes-law-politics"], ["wordnet-person-location"]], frame)
    assert main(["group", "--data", str(suite_grads / "suite"), "--grads", str(suite_grads / "grads"),
                 "--groups", "4", "--out", str(tmp_path / "g")]) == 2
    assert "--groups 4 is more than the 3 tasks in the store" in capsys.readouterr().err
    assert main(["group", "--data", str(suite_grads / "suite"), "--grads", str(suite_grads / "grads"),
                 "--groups", "0", "--out", str(tmp_path / "g")]) == 2
    assert "key 'groups'" in capsys.readouterr().err


def _lora_tiny(seed: int = 0):
    """tiny-llama with a LoRA whose factors are all non-zero (so every factor has a gradient)."""
    import torch

    from engine.config import LoraSpec
    from engine.features.per_example import AnswerScore
    from engine.models import builtin, load, lora

    path = builtin.resolve("tiny-llama")
    model = lora.add_lora(load.load_causal_lm(path), LoraSpec(r=4, seed=seed))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return load.load_tokenizer(path), AnswerScore(model)


def test_training_loss_is_cross_entropy_even_for_a_very_wrong_answer():
    """The training loss is the answer tokens' cross-entropy: its value and gradient equal a plain
    F.cross_entropy on the logits, also where the gold token's probability is far below 0.001
    (where softplus(-clipped f) had about p / 0.01 of the gradient)."""
    import torch

    from engine.features import answers, objective

    tokenizer, score = _lora_tiny()
    prompts = [tokenizer("A small furry animal that climbs trees.\nAnswer:")["input_ids"],
               tokenizer("Stock markets fell sharply today.\nAnswer:")["input_ids"]]
    with torch.no_grad():
        last = [score.model(torch.tensor([p])).logits[0, -1] for p in prompts]
    gold = [int(logits.argmin()) for logits in last]  # the least likely next token: a very wrong prediction
    assert max(float(logits.softmax(-1)[g]) for logits, g in zip(last, gold)) < 1e-3  # inside the clip
    batch = answers.collate([(p + [g], len(p)) for p, g in zip(prompts, gold)], tokenizer.pad_token_id)
    params = [p for p in score.model.parameters() if p.requires_grad]

    value = objective.loss(score, batch)
    ours = torch.autograd.grad(value, params)
    logits = torch.stack([score.model(torch.tensor([p])).logits[0, -1] for p in prompts])
    reference = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(gold))
    theirs = torch.autograd.grad(reference, params)
    assert float(value) == pytest.approx(float(reference), rel=1e-4)
    norm = lambda grads: float(sum(g.norm() ** 2 for g in grads) ** 0.5)  # noqa: E731
    assert norm(ours) == pytest.approx(norm(theirs), rel=1e-3)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-3) for a, b in zip(ours, theirs))


def test_labels_loss_is_cross_entropy_over_the_tasks_labels():
    """The group adapters' loss (objective `labels`): its value and gradient are those of
    F.cross_entropy on the next-token logits restricted to the task's label tokens -- the class
    probability the ensemble scores -- for tasks with two and three labels in one batch."""
    import torch

    from engine.features import objective

    tokenizer, score = _lora_tiny(seed=2)
    prompts = [tokenizer("A small furry animal that climbs trees.\nAnswer:")["input_ids"],
               tokenizer("The senate voted on the new tax law.\nAnswer:")["input_ids"]]
    labels = [[11, 17], [23, 5, 40]]  # token ids of each task's labels; gold: 17 and 23
    gold = [1, 0]
    examples = [(p, [ids[g], *ids[:g], *ids[g + 1:]]) for p, ids, g in zip(prompts, labels, gold)]
    params = [p for p in score.model.parameters() if p.requires_grad]

    value = objective.loss(score, objective.collate(examples, tokenizer.pad_token_id, "labels"), "labels")
    ours = torch.autograd.grad(value, params)
    last = [score.model(torch.tensor([p])).logits[0, -1].float() for p in prompts]
    reference = sum(torch.nn.functional.cross_entropy(logits[ids][None], torch.tensor([g]))
                    for logits, ids, g in zip(last, labels, gold)) / 2
    theirs = torch.autograd.grad(reference, params)
    assert float(value) == pytest.approx(float(reference), rel=1e-4)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-3) for a, b in zip(ours, theirs))


def test_scoring_shares_the_layers_below_the_adapters(tmp_path):
    """With LoRA on the top layer only, the ensemble runs the layer below once per batch for
    every model and gives the same label log-probabilities as whole forward passes, for each
    adapter and the bare base; an adapter on every layer leaves nothing to share."""
    import torch

    from engine.ensemble.model import EnsembleModel
    from tests.conftest import write_random_adapter

    for k in range(2):
        write_random_adapter(tmp_path / f"a{k}", seed=k, layers=[1])
    entries = [manifest.AdapterEntry(name=f"a{k}", path=f"a{k}", tasks=["t"], rank=4) for k in range(2)]
    start = manifest.Manifest(base_model="tiny-llama", max_lora_rank=4, adapters=entries, tasks={
        "t": manifest.TaskEntry(labels=["animal", "plant"], weights={"a0": 0.5, "a1": 0.5})})
    ensemble = EnsembleModel.load(manifest.load(manifest.write(start, tmp_path)))
    assert ensemble.shared_from == 1
    texts = ["a small furry animal", "a tall tree with needles", "x", "an animal that lives in the sea and eats fish"]
    shared = ensemble.label_logprobs("t", texts, adapters=["a0", "a1", None], batch=3)
    ensemble.shared_from = None
    whole = ensemble.label_logprobs("t", texts, adapters=["a0", "a1", None], batch=3)
    for name in whole:
        assert torch.allclose(shared[name], whole[name], atol=1e-5), name
    assert not torch.allclose(whole["a0"], whole["a1"], atol=1e-3)  # the adapters differ: a mix-up would show

    write_random_adapter(tmp_path / "every", seed=5)
    every = manifest.AdapterEntry(name="every", path="every", tasks=["t"], rank=4)
    ensemble.update(manifest.load(manifest.write(start.model_copy(update={"adapters": [*entries, every]}), tmp_path)))
    assert ensemble.shared_from is None


def test_residual_w_is_the_ridge_solution():
    import torch

    from engine.ensemble import boost

    generator = torch.Generator().manual_seed(0)
    G = torch.randn(60, 8, generator=generator, dtype=torch.float64)
    w_true = torch.randn(8, generator=generator, dtype=torch.float64)
    r = G @ w_true
    # No penalty, an exact target: the generating w comes back.
    assert torch.allclose(boost.residual_w(G, r, 1e-9), w_true, atol=1e-6)
    # A penalty: the normal equations hold, the solution shrinks, and it still fits better than w = 0.
    noisy = r + torch.randn(60, generator=generator, dtype=torch.float64)
    w = boost.residual_w(G, noisy, 10.0)
    assert torch.allclose(G.T @ (G @ w - noisy) + 10.0 * w, torch.zeros(8, dtype=torch.float64), atol=1e-9)
    assert w.norm() < boost.residual_w(G, noisy, 1e-9).norm()
    assert (G @ w - noisy).norm() < noisy.norm()


def test_line_search_finds_the_minimising_step_or_none():
    from engine.ensemble import boost

    nu, value = boost.line_search(lambda v: (v - 0.3) ** 2 + 1.0, 1.0)
    assert nu == pytest.approx(0.3, abs=2e-3) and value == pytest.approx(1.0, abs=1e-5)
    assert boost.line_search(lambda v: 1.0 + v, 1.0) == (0.0, 1.0)  # every step makes it worse


def test_a_boosting_round_lowers_the_training_residual(suite_grads, tmp_path):
    """One round on the tiny Llama: the residual adapter, added in label-logit space with the
    step found on validation rows, lowers the training rows' mean 1 - p(gold), because it moves
    their gold label-set log-odds the way its ridge fit predicted: up on average (the residual is
    positive everywhere) and row by row. Before issue 14's fix the design rows were centred per
    task, so the predicted change averaged exactly 0 over each task's rows and the real one did
    not follow it (jobs/bench/boosting.py); the demo's rounds were rejected."""
    from engine.ensemble import evaluate
    from engine.ensemble.model import EnsembleModel
    from engine.train.ensemble import _boost
    from tests.conftest import write_random_adapter

    out = tmp_path / "ens"
    write_random_adapter(out / "adapters" / "group-0", seed=1, r=8)
    frame = pl.read_parquet(suite_grads / "suite" / "examples.parquet").with_columns(pl.col("split").fill_null("train"))
    tasks = sorted(frame["task"].unique())
    entry = manifest.AdapterEntry(name="group-0", path="adapters/group-0", tasks=tasks, rank=8)
    start = manifest.Manifest(base_model="tiny-llama", max_lora_rank=8, adapters=[entry], tasks={
        t: manifest.TaskEntry(labels=sorted(frame.filter(pl.col("task") == t)["label"].unique()),
                              weights={"group-0": 1.0}) for t in tasks})
    ensemble = EnsembleModel.load(manifest.load(manifest.write(start, out)))
    scores = evaluate.score_rows(ensemble, frame.filter(pl.col("split") == "validation"))
    final, rounds = _boost(EnsembleTrainConfig(out=out, boost=1, boost_max_step=8.0), ensemble, start,
                           suite_grads / "grads", frame, scores, out)
    assert rounds[0]["step"] > 0 and rounds[0]["validation_nll"] < rounds[0]["before"]
    assert rounds[0]["train_residual"] < rounds[0]["train_residual_before"]
    assert rounds[0]["accepted"] and [b.adapter for b in final.tasks[tasks[0]].boost] == ["boost-1"]
    assert rounds[0]["update_norm"] <= rounds[0]["max_norm"] + 1e-6
    # The margins rose about as much as predicted (before: a prediction of 0 on average).
    assert 0.5 < rounds[0]["odds_change"] / rounds[0]["predicted_odds_change"] < 2, rounds[0]
    assert rounds[0]["first_order_pearson"] > 0.5, rounds[0]


@pytest.mark.slow
def test_each_adapter_beats_the_others_on_its_own_tasks(tmp_path, ray_session):
    """Real training (SmolLM2-135M, LoRA on its top 2 layers, 36 training rows per task, 16 steps
    of the group adapters' `labels` objective): on the held-out test rows, each group's adapter
    has a lower label NLL on its own task than the other group's adapter and than the base model,
    and at least the base's accuracy; the EM weights give each task mostly to its own adapter.
    (With plain cross-entropy on the answer tokens, the objective before issue 14 defect 6, the
    same steps raised every label token together -- the answer format -- and left the adapters'
    label NLL above the base model's.)"""
    tasks = ["wordnet-animal-plant", "fortunes-law-politics"]
    assert main(["suite", "--out", str(tmp_path / "suite"), "--per-task", "60", "--set", f"tasks=[{', '.join(tasks)}]",
                 "--set", "test=0.2"]) == 0
    assert main(["featurize", "grads", "--data", str(tmp_path / "suite"), "--out", str(tmp_path / "grads"),
                 "--model", "smollm2-135m", "--dim", "16", "--max-length", "48", "--set", "lora.layers=[28, 29]"]) == 0
    report = train_ensemble(EnsembleTrainConfig(partition=[[t] for t in tasks], data=tmp_path / "suite",
                                                grads=tmp_path / "grads", out=tmp_path / "ens", epochs=2,
                                                steps_per_epoch=8, lr=3e-3, batch_size=8))
    assert report["config"]["objective"] == "labels"
    for k, task in enumerate(tasks):
        own, other = f"group-{k}", f"group-{1 - k}"
        scores = report["test"]["tasks"][task]
        assert scores["adapters"][own]["rows"] == 12
        assert scores["adapters"][own]["nll"] < min(scores["adapters"][other]["nll"], scores["base"]["nll"]), scores
        assert scores["adapters"][own]["accuracy"] >= scores["base"]["accuracy"], scores
        assert report["weights"][task].get(own, 0.0) > 0.5, report["weights"]


def test_paired_bootstrap_intervals():
    """Intervals hold the sample's value and narrow with more rows; a real gap is found, none
    is claimed between identical predictions."""
    import numpy as np

    from engine.ensemble import metrics

    rng = np.random.default_rng(0)

    def sample(n: int, right_a: float, right_b: float):
        tasks = np.repeat(["t1", "t2"], n // 2)
        gold = rng.choice(["x", "y"], n)
        flip = {"x": "y", "y": "x"}
        wrong = np.array([flip[g] for g in gold])
        return tasks, gold, np.where(rng.random(n) < right_a, gold, wrong), np.where(rng.random(n) < right_b, gold, wrong)

    small = metrics.paired_bootstrap(*sample(60, 0.9, 0.55), replicates=500)
    large = metrics.paired_bootstrap(*sample(2000, 0.9, 0.55), replicates=500)
    for c in small + large:
        assert c.a.low <= c.a.value <= c.a.high and c.difference.low <= c.difference.value <= c.difference.high
    assert all(c.significant for c in large)
    assert large[0].difference.high - large[0].difference.low < small[0].difference.high - small[0].difference.low
    tasks, gold, a, _ = sample(60, 0.7, 0.7)
    same = metrics.paired_bootstrap(tasks, gold, a, a, replicates=200)
    assert not any(c.significant for c in same) and same[0].difference.value == 0


def test_train_lora_validation_accuracy_is_over_each_tasks_labels():
    """train-lora scores validation rows as the ensemble will: the argmax over the task's labels
    of the first answer token's log-probability (a plain forward gives the same), averaged over
    tasks; not "gold token above one half", which an untrained model never reaches."""
    import torch

    from engine.config import LoraTrainConfig
    from engine.train import lora as train_lora_module

    tokenizer, score = _lora_tiny(seed=3)
    cfg = LoraTrainConfig(max_length=32)
    frame = pl.DataFrame({"task": ["animals"] * 3 + ["law"] * 2, "label": ["animal", "plant", "plant", "law", "politics"],
                          "text": ["a cat", "an oak tree", "a fern", "the court ruled", "the senate voted"]})
    choices = {"animals": ["animal", "plant"], "law": ["law", "politics"]}
    rows = train_lora_module.label_rows(tokenizer, cfg, frame, choices)
    accuracy = train_lora_module.label_accuracy(score.model, rows, tokenizer.pad_token_id)
    expected = []
    for task in ["animals", "law"]:
        part = frame.filter(pl.col("task") == task)
        ids = [tokenizer(f" {label}", add_special_tokens=False)["input_ids"][0] for label in choices[task]]
        right = []
        for text, label in zip(part["text"], part["label"]):
            with torch.no_grad():
                logits = score.model(torch.tensor([tokenizer(f"{text}\nAnswer:")["input_ids"]])).logits[0, -1]
            right.append(int(logits[ids].argmax()) == choices[task].index(label))
        expected.append(sum(right) / len(right))
    assert accuracy == pytest.approx(sum(expected) / 2)
    assert accuracy > 0  # some row's gold label wins over the other label, though p(gold) << 1/2


def test_boosting_design_is_the_gradient_of_the_gold_label_odds(suite_grads, tmp_path):
    """A boosting adapter is fitted by a ridge of the residual on `boost.design`: per training row,
    the projected gradient at the anchor of its gold label's log-odds among the task's labels, the
    margin a boosting step moves once the ensemble renormalises over the labels. The log-odds are
    the ones the ensemble scores, and lifting a small w onto the anchor moves them by X w (1%
    error measured). The design before, the gradient store's rows centred per task (the gradient
    of the gold answer's log-odds over the whole vocabulary), missed that change by 98%."""
    import numpy as np
    import torch

    from engine.ensemble import boost, evaluate, labels
    from engine.features.store import FeatureStore
    from engine.models.anchor import Anchor
    from tests.conftest import write_random_adapter

    frame = pl.read_parquet(suite_grads / "suite" / "examples.parquet").filter(pl.col("split") == "train")
    tasks = sorted(frame["task"].unique())
    frame = frame.sort("task", maintain_order=True)
    write_random_adapter(tmp_path / "a", seed=0)
    choices = {t: sorted(frame.filter(pl.col("task") == t)["label"].unique()) for t in tasks}
    spec = manifest.Manifest(base_model="tiny-llama", max_lora_rank=4, adapters=[
        manifest.AdapterEntry(name="a", path="a", tasks=tasks, rank=4)], tasks={
        t: manifest.TaskEntry(labels=choices[t], weights={"a": 1.0}) for t in tasks})
    anchor = Anchor(suite_grads / "grads")
    tokenizer, model = anchor.featurizer.tokenizer, anchor.featurizer.score.model
    X, odds = boost.design(anchor, tokenizer, spec, frame)

    def scored() -> torch.Tensor:  # the gold label-set log-odds of every row, as the ensemble scores them
        parts = []
        for task in tasks:
            part = frame.filter(pl.col("task") == task)
            prompts = [labels.prompt_ids(tokenizer, spec, text, task) for text in part["text"]]
            ids = labels.label_token_ids(tokenizer, spec.answer, choices[task])
            logprobs = labels.next_token_logprobs(model, prompts, ids, tokenizer.pad_token_id)
            gold = np.array([choices[task].index(y) for y in part["label"]])
            parts.append(torch.as_tensor(evaluate.TaskScores(gold, {None: logprobs}).gold_odds(None)))
        return torch.cat(parts)

    at_anchor = scored()
    assert torch.allclose(odds, at_anchor, atol=1e-4)
    w = torch.randn(X.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w *= 0.05 / anchor.load(w)
    assert anchor.load(w) == pytest.approx(0.05)  # a small |P w|, where the first-order model holds
    moved = scored() - at_anchor
    anchor.reset()
    assert float((moved - X @ w).norm() / moved.norm()) < 0.05
    store = FeatureStore(suite_grads / "grads")
    index = {i: k for k, i in enumerate(store.rows()["id"])}
    G = torch.as_tensor(np.array(store.vectors())[[index[i] for i in frame["id"]]], dtype=torch.float64)
    for task in tasks:  # the design before: each task's mean row subtracted
        rows = torch.as_tensor((frame["task"] == task).to_numpy())
        G[rows] -= G[rows].mean(0)
    assert float((moved - G @ w).norm() / moved.norm()) > 0.5
