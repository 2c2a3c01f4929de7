"""The first-order estimator: the batched solver against per-subset references; the searches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.errors import SiftError
from engine.select.tasks import estimator, subsets
from engine.select.tasks.subsets import TaskGradients


def _problem(seed=0, n_tasks=5, per=80, d=24):
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(n_tasks * per, d)) * 0.3
    f = rng.normal(size=n_tasks * per) - 0.5
    task = np.repeat(np.arange(n_tasks), per)
    masks = (rng.random((12, n_tasks)) < 0.5)
    masks[masks.sum(1) == 0, 0] = True
    return G, f, masks[:, task]


def test_batched_newton_matches_per_subset_lbfgs():
    G, f, masks = _problem()
    fit = estimator.fit_subsets(torch.tensor(G), torch.tensor(f), torch.tensor(masks), lam=1e-3, tol=1e-10)
    reference = estimator.fit_subsets_reference(G, f, masks, lam=1e-3)
    assert fit.converged.all()
    assert np.abs(fit.w.numpy() - reference).max() <= 1e-5 * np.abs(reference).max() + 1e-8


def test_gradex_matches_sklearn_on_sign_flipped_rows():
    G, _, masks = _problem(seed=1)
    w = estimator.gradex_fit(torch.tensor(G), torch.tensor(masks[:3]), C=0.5)
    for s in range(3):
        reference = estimator.gradex_reference(G, masks[s], C=0.5, seed=s)
        assert np.allclose(w[s].numpy(), reference, rtol=1e-4, atol=1e-6)
    scaled = estimator.gradex_fit(torch.tensor(G), torch.tensor(masks[:2]), C=0.5, norm=0.2)
    assert torch.allclose(scaled.norm(dim=1), torch.full((2,), 0.2, dtype=scaled.dtype))


def test_linearised_scores():
    W = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    G = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    f = torch.tensor([-1.0, 0.5])
    scores = estimator.linearised_scores(W, G, f)
    z = torch.tensor([[1.0, 0.5], [-2.0, -2.5]])
    assert torch.allclose(scores.loss, torch.nn.functional.softplus(-z).mean(1))
    assert scores.accuracy.tolist() == [1.0, 0.0]


def test_bad_fits_are_clear_errors():
    G, f, masks = _problem()
    with pytest.raises(SiftError, match="lambda must be > 0"):
        estimator.fit_subsets(torch.tensor(G), torch.tensor(f), torch.tensor(masks), lam=0)
    bad = G.copy()
    bad[3, 2] = np.nan
    with pytest.raises(SiftError, match="NaN or infinite"):
        estimator.fit_subsets(torch.tensor(bad), torch.tensor(f), torch.tensor(masks))
    empty = masks.copy()
    empty[0] = False
    with pytest.raises(SiftError, match="1 subset\\(s\\) hold no training rows"):
        estimator.fit_subsets(torch.tensor(G), torch.tensor(f), torch.tensor(empty))


def _tasks(seed=0, d=32, per=60):
    """A target, two helpful tasks (same direction), two harmful (flipped), one unrelated."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    other = rng.normal(size=d)
    other -= (other @ u) * u
    other /= np.linalg.norm(other)
    directions = {"target": u, "help-a": u, "help-b": u, "harm-a": -u, "harm-b": -u, "unrelated": other}
    G, task, train = [], [], []
    for i, (name, direction) in enumerate(directions.items()):
        G.append(direction * 2.0 + 0.5 * rng.normal(size=(per, d)))
        task += [i] * per
        train += [True] * (per // 2 if name == "target" else per) + [False] * (per - per // 2 if name == "target" else 0)
    G = np.vstack(G)
    return TaskGradients(list(directions), torch.tensor(G), torch.full((len(G),), -1.0, dtype=torch.float64),
                         torch.tensor(task), torch.tensor(train))


def test_searches_rank_helpful_tasks_above_harmful_ones():
    data = _tasks()
    candidates = ["help-a", "help-b", "harm-a", "harm-b", "unrelated"]
    sets = subsets.random_subsets(len(candidates), 60, 0.4, seed=0)
    est = subsets.estimate(data, ["target"], sets, candidates, lam=1e-2)
    ensemble = dict(zip(candidates, subsets.random_ensemble(est)))
    assert max(ensemble["help-a"], ensemble["help-b"]) < ensemble["unrelated"] < min(ensemble["harm-a"], ensemble["harm-b"])
    ridge = dict(zip(candidates, subsets.ridge_surrogate(est)))
    assert max(ridge["help-a"], ridge["help-b"]) < 0 < min(ridge["harm-a"], ridge["harm-b"])
    order = sorted(candidates, key=ensemble.get)
    chosen, trace = subsets.forward_selection(data, ["target"], candidates, order, lam=1e-2)
    assert {"help-a", "help-b"} <= set(chosen) and not {"harm-a", "harm-b"} & set(chosen)
    assert trace == sorted(trace, reverse=True)


def test_unknown_target_and_top_up():
    data = _tasks()
    with pytest.raises(SiftError, match=r"target task\(s\) \['nope'\] not in the gradient store"):
        subsets.estimate(data, ["nope"], np.ones((1, 1), dtype=bool), ["help-a"])
    topped = subsets._top_up(data, rows=100, seed=0)
    counts = [int(topped.rows(t, train=True).sum()) for t in topped.tasks]
    assert counts == [100] * len(topped.tasks)
    few = TaskGradients(["t"], data.G[:3], data.f[:3], torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.bool))
    with pytest.raises(SiftError, match="task 't' has 3 training rows; at least 8"):
        subsets._top_up(few, rows=50, seed=0)


def test_suite_to_select_tasks_end_to_end(tmp_path, ray_session):
    """suite -> gradient store (tiny Llama) -> select-tasks, through the real commands."""
    import json

    import polars as pl

    from engine.cli import main

    tasks = "[tweet-polarity, wordnet-animal-plant, fortunes-law-politics]"
    assert main(["suite", "--out", str(tmp_path / "suite"), "--per-task", "40", "--set", f"tasks={tasks}",
                 "--noisy-groups", "2", "--noisy-shuffled", "1"]) == 0
    examples = pl.read_parquet(tmp_path / "suite" / "examples.parquet")
    assert examples["task"].n_unique() == 5 and set(examples["split"]) == {"train", "validation"}
    assert main(["featurize", "grads", "--data", str(tmp_path / "suite"), "--out", str(tmp_path / "grads"),
                 "--model", "tiny-llama", "--dim", "64"]) == 0
    assert main(["select-tasks", "--data", str(tmp_path / "suite"), "--grads", str(tmp_path / "grads"),
                 "--target", "wordnet-animal-plant", "--out", str(tmp_path / "sel"), "--subsets", "30",
                 "--set", "eval=forward"]) == 0
    report = json.loads((tmp_path / "sel" / "report.json").read_text())
    assert set(report["estimates"]) == {"selected", "target only", "all tasks"}
    assert all(np.isfinite(v["forward_loss"]) for v in report["estimates"].values())
    scored = pl.read_parquet(tmp_path / "sel" / "tasks.parquet")
    assert scored.height == 4 and scored["ensemble_score"].is_finite().all()
    assert (tmp_path / "sel" / "report.png").is_file()
    assert main(["select-tasks", "--data", str(tmp_path / "suite"), "--grads", str(tmp_path / "grads"),
                 "--target", "nope", "--out", str(tmp_path / "x")]) == 2
    tune = ["select-tasks", "--data", str(tmp_path / "suite"), "--grads", str(tmp_path / "grads"),
            "--target", "wordnet-animal-plant", "--out", str(tmp_path / "tune"), "--search", "tune", "--subsets", "4"]
    assert main(tune) == 0
    first = pl.read_parquet(tmp_path / "tune" / "subsets.parquet")
    assert first.height == 4 and first["loss"].is_finite().all()
    assert main(tune) == 0  # the finished Tune experiment is restored, not rerun
    assert pl.read_parquet(tmp_path / "tune" / "subsets.parquet").equals(first)


def test_calibration_runs_real_fine_tunes_under_ray_tune(tmp_path, ray_session):
    """`sift estimate --calibrate` end to end on a small suite (tiny Llama, 3 subsets, 5 steps)."""
    import json

    from engine.cli import main

    tasks = "[tweet-polarity, wordnet-animal-plant, wordnet-person-location, fortunes-law-politics]"
    assert main(["suite", "--out", str(tmp_path / "suite"), "--per-task", "40", "--set", f"tasks={tasks}"]) == 0
    assert main(["featurize", "grads", "--data", str(tmp_path / "suite"), "--out", str(tmp_path / "grads"),
                 "--model", "tiny-llama", "--dim", "32"]) == 0
    assert main(["estimate", "--calibrate", "--data", str(tmp_path / "suite"), "--grads", str(tmp_path / "grads"),
                 "--target", "wordnet-animal-plant", "--out", str(tmp_path / "cal"), "--subsets", "3",
                 "--steps", "5", "--set", "eval_rows=16"]) == 0
    report = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert len(report["real_loss"]) == len(report["estimated_loss"]) == 3
    assert all(np.isfinite(report["real_loss"])) and report["time_ratio"] > 1
    errors = [a["mean_r2"] for a in report["approximation"]]
    assert errors[0] < errors[-1], "a 8x larger update must leave the first-order regime further"
    assert (tmp_path / "cal" / "calibration.png").is_file()


def test_clusters_of_gradients_become_the_units():
    data = _tasks()
    clustered, mix = subsets.cluster_units(data, ["target"], clusters=3, seed=0)
    assert clustered.tasks[0] == "target" and len(clustered.tasks) == 4
    def kind(members: dict[str, int]) -> str:
        """help / harm / unrelated when at least 90% of a cluster's rows are of that kind."""
        for name in ("help", "harm", "unrelated"):
            if sum(n for t, n in members.items() if t.startswith(name)) >= 0.9 * sum(members.values()):
                return name
        return "mixed"

    kinds = {c: kind(m) for c, m in mix.items()}
    assert sorted(kinds.values()) == ["harm", "help", "unrelated"], mix
    candidates = clustered.tasks[1:]
    est = subsets.estimate(clustered, ["target"], subsets.random_subsets(3, 30, 0.5, 0), candidates, lam=1e-2)
    effect = {kinds[c]: e for c, e in zip(candidates, subsets.random_ensemble(est))}
    assert effect["help"] < 0 < effect["harm"]


def test_train_lora_with_ray_train_resumes_and_anchors_features(tmp_path, ray_session):
    """Two data-parallel workers, best epoch kept, a rerun resumes; the adapter anchors a gradient store."""
    import json

    from engine.cli import main
    from engine.config import LoraTrainConfig
    from engine.train.lora import train_lora

    assert main(["suite", "--out", str(tmp_path / "suite"), "--per-task", "40", "--set",
                 "tasks=[tweet-polarity, wordnet-animal-plant]"]) == 0
    cfg = LoraTrainConfig(data=tmp_path / "suite", model="tiny-llama", out=tmp_path / "anchor", epochs=2, workers=2,
                          steps_per_epoch=4, batch_size=8)
    first = train_lora(cfg)
    assert [m["epoch"] for m in first["history"]] == [0, 1]
    best = max(first["history"], key=lambda m: (m["val_accuracy"], -m["val_loss"]))
    assert first["best"]["epoch"] == best["epoch"]
    resumed = train_lora(cfg.model_copy(update={"epochs": 3}))
    assert [m["epoch"] for m in resumed["history"]] == [0, 1, 2]
    assert resumed["history"][:2] == first["history"]  # epochs 0-1 restored, not retrained
    assert (tmp_path / "anchor" / "adapter" / "adapter_model.safetensors").is_file()
    assert main(["featurize", "grads", "--data", str(tmp_path / "suite"), "--out", str(tmp_path / "grads"),
                 "--model", "tiny-llama", "--adapter", str(tmp_path / "anchor" / "adapter"), "--dim", "16"]) == 0
    manifest = json.loads((tmp_path / "grads" / "manifest.json").read_text())
    assert manifest["fingerprint"]["adapter"].startswith("adapter@")
    with pytest.raises(SiftError, match=r"task\(s\) \['nope'\] not in"):
        train_lora(cfg.model_copy(update={"tasks": ["nope"], "out": tmp_path / "x"}))


def test_qlora_trains_on_cpu(tmp_path, ray_session):
    from engine.config import LoraTrainConfig
    from engine.data import suite
    from engine.train.lora import train_lora

    suite.build(per_task=24, tasks=["wordnet-animal-plant"]).write_parquet(tmp_path / "s.parquet")
    report = train_lora(LoraTrainConfig(data=tmp_path / "s.parquet", model="tiny-llama", out=tmp_path / "q",
                                        quantize="nf4", epochs=1, steps_per_epoch=2, batch_size=4))
    assert np.isfinite(report["best"]["train_loss"]) and np.isfinite(report["best"]["val_loss"])


def test_lm_objective_adapts_to_raw_texts(tmp_path, ray_session):
    import polars as pl

    from engine.config import LoraTrainConfig
    from engine.data import corpora
    from engine.train.lora import train_lora

    texts = corpora.load("wordnet").sample(120, seed=0).with_columns(
        split=pl.when(pl.int_range(pl.len()) < 20).then(pl.lit("validation")).otherwise(pl.lit("train")),
        label=pl.lit(None, dtype=pl.String))
    texts.write_parquet(tmp_path / "texts.parquet")
    report = train_lora(LoraTrainConfig(data=tmp_path / "texts.parquet", model="tiny-llama", out=tmp_path / "lm",
                                        objective="lm", epochs=2, steps_per_epoch=10, batch_size=8, lr=1e-2))
    first, second = report["history"]
    assert second["val_loss"] < first["val_loss"]  # in-domain text gets likelier
    assert report["best"]["epoch"] == 1
