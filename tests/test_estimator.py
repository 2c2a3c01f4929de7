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


def test_linearised_scores_take_the_argmax_over_each_tasks_labels():
    """Accuracy is the argmax over the task's label set (not p(gold) > 1/2), macro-F1 as sklearn's."""
    from sklearn.metrics import f1_score

    W = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    G = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    f = torch.tensor([-1.0, 0.5])
    scores = estimator.linearised_scores(W, G, f)
    z = torch.tensor([[1.0, 0.5], [-2.0, -2.5]])
    assert torch.allclose(scores.loss, torch.nn.functional.softplus(-z).mean(1))
    assert scores.accuracy is None and scores.macro_f1 is None
    # three rows of one task with labels {a, b}: gold a, a, b. Both labels' f* are below 0 (p < 1/2)
    # on every row, yet the argmax still classifies.
    labels = estimator.LabelRows(
        f=torch.tensor([[-1.0, -2.0], [-3.0, -2.0], [-3.0, -1.0]]),
        G=torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[2.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]),
        gold=torch.tensor([0, 0, 1]), task_of_class=torch.tensor([0, 0]))
    W = torch.tensor([[0.0, 0.0], [1.0, 0.0]])  # the second w flips row 1 to its gold label
    scores = estimator.linearised_scores(W, torch.zeros(3, 2), torch.zeros(3), labels)
    assert scores.accuracy.tolist() == pytest.approx([2 / 3, 1.0])
    expected = f1_score([0, 0, 1], [0, 1, 1], average="macro")
    assert scores.macro_f1.tolist() == pytest.approx([expected, 1.0])


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
    """`sift estimate --calibrate` end to end on a small suite (tiny Llama, 3 subsets, 6 steps): the
    fine-tunes train on the estimator's rows and lower the target loss (their curves are kept), the
    constant predictor stands beside the estimator, accuracy is the argmax over the labels."""
    import json

    from engine.cli import main

    import polars as pl

    tasks = "[tweet-polarity, wordnet-animal-plant, wordnet-person-location, fortunes-law-politics]"
    assert main(["suite", "--out", str(tmp_path / "suite"), "--per-task", "40", "--set", f"tasks={tasks}"]) == 0
    assert main(["featurize", "grads", "--data", str(tmp_path / "suite"), "--out", str(tmp_path / "grads"),
                 "--model", "tiny-llama", "--dim", "32"]) == 0
    assert main(["estimate", "--calibrate", "--data", str(tmp_path / "suite"), "--grads", str(tmp_path / "grads"),
                 "--target", "wordnet-animal-plant", "--out", str(tmp_path / "cal"), "--subsets", "3",
                 "--steps", "6", "--set", "eval_rows=16", "--set", "lr=3e-3", "--set", "eval_every=3"]) == 0
    report = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert len(report["real_loss"]) == len(report["estimated_loss"]) == 3
    assert all(np.isfinite(report["real_loss"])) and report["time_ratio"] > 1
    curves = report["curves"]
    assert [c["steps"] for c in curves] == [[0, 3, 6]] * 3 and all(len(c["train_loss"]) == 6 for c in curves)
    assert report["fine_tunes_lowering_target_loss"] == 3, [c["target_loss"] for c in curves]
    # training rows: the target's 32 and those of the subset's tasks, exactly as the estimate fitted
    assert sorted(c["train_rows"] for c in curves) == sorted(32 + 32 * len(s) for s in report["subsets"])
    assert report["constant_as_good"] == (report["constant_mean_squared_relative_error"]
                                          <= report["mean_squared_relative_error"])
    for key in ("estimated_accuracy", "real_accuracy", "estimated_macro_f1", "real_macro_f1"):
        assert all(0 <= v <= 1 for v in report[key]), key
    errors = [a["mean_r2"] for a in report["approximation"]]
    assert errors[0] < errors[-1], "a 8x larger update must leave the first-order regime further"
    # every estimate held to the radius the fine-tunes measured: r_k <= |u_k|, |w| <= the median r_k
    radius = report["measured_radius"]
    assert report["radius"] == f"measured: {radius:g}" and 0 < radius == sorted(report["progress_radius"])[1]
    assert all(r <= u * (1 + 1e-9) for r, u in zip(report["progress_radius"], report["real_projected_update_norm"]))
    norms = sorted(report["real_projected_update_norm"])  # torch's median: the lower middle value
    assert report["ranking_radius"] == pytest.approx(norms[(len(norms) - 1) // 2], rel=1e-6)
    assert max(report["estimated_update_norm"]) <= radius * (1 + 2e-3)
    converged = report["variants"][0]
    assert converged["name"] == "converged (no radius)" and min(converged["update_norm"]) > radius
    assert (tmp_path / "cal" / "calibration.png").is_file()
    # every target row's f, paired by id: the anchor's, each estimate's, each fine-tune's per curve point
    rows = pl.read_parquet(tmp_path / "cal" / "rows.parquet")
    n = rows.filter(pl.col("source") == "anchor").height
    assert rows.filter(pl.col("source") == "fine-tune").height == 3 * 2 * n
    final = rows.filter((pl.col("source") == "fine-tune") & (pl.col("step") == 6)).sort("subset")
    losses = final.group_by("subset", maintain_order=True).agg((-pl.col("f")).exp().log1p().mean())["f"]
    assert losses.to_list() == pytest.approx(report["real_loss"], rel=1e-6)

    # a second seed per subset: the first seed's fine-tunes are reused, each real loss is the mean
    from engine.config import CalibrateConfig
    from engine.select.tasks.calibrate import calibrate

    again = calibrate(CalibrateConfig(data=str(tmp_path / "suite"), grads=str(tmp_path / "grads"),
                                      target=["wordnet-animal-plant"], out=str(tmp_path / "cal"), subsets=3, steps=6,
                                      eval_rows=16, lr=3e-3, eval_every=3, seeds=2))
    assert [c["seed"] for c in again["curves"]] == [0, 1] * 3 and again["seeds"] == 2
    def trained(curve: dict) -> dict:  # a fine-tune's results, not its timing
        return {k: v for k, v in curve.items() if k != "seconds"}

    assert [trained(c) for c in again["curves"] if c["seed"] == 0] == [trained(c) for c in curves]
    assert [losses[0] for losses in again["real_loss_by_seed"]] == report["real_loss"]
    assert again["real_loss"] == pytest.approx([np.mean(s) for s in again["real_loss_by_seed"]])
    assert again["seed_spearman"] is not None
    # kept by what they depend on: a subset drawn twice (3 candidates, 2 in each) is one fine-tune per seed
    distinct = len({tuple(s) for s in report["subsets"]})
    assert len(list((tmp_path / "cal" / "fine-tunes").iterdir())) == 2 * distinct


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
    # AdamW's moments are restored with the adapter: the resumed epoch is the uninterrupted run's
    fresh = train_lora(cfg.model_copy(update={"epochs": 3, "out": tmp_path / "fresh"}))
    for key in ("train_loss", "val_loss"):
        assert resumed["history"][2][key] == pytest.approx(fresh["history"][2][key], rel=1e-4)
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


def _anchor_store(tmp_path, rows: int = 16):
    """A gradient store's config and factor record plus the features of `rows` suite rows, built
    in-process (no Ray): what `sift featurize grads` would write, for a fresh tiny-Llama LoRA."""
    from engine.config import GradsConfig, LoraSpec
    from engine.data import suite
    from engine.features.grads import GradFeaturizer

    cfg = GradsConfig(model="tiny-llama", out=tmp_path, dim=32, max_length=48,
                      lora=LoraSpec(r=4, target_modules=["q_proj", "v_proj"]))
    (tmp_path / "config.json").write_text(cfg.model_dump_json())
    frame = suite.build(per_task=rows, validation=0.25, tasks=["wordnet-animal-plant"])
    featurized = GradFeaturizer(cfg, threads=1)(frame)
    return frame, featurized


def test_lifting_only_factors_with_a_gradient_keeps_the_update_first_order():
    """Defect: at a fresh LoRA (B = 0) the gradient w.r.t. lora_A is zero, yet P w was added to
    lora_A too; its second-order Delta B Delta A change made the first-order estimate no better than
    no update at all (one 64x64 layer, rank 8: mean r^2 0.30 with the gradient term vs 0.30
    without at |P w| = 3). Projecting and lifting only the factors with a gradient: 0.02 vs 0.33."""
    from peft import LoraConfig, get_peft_model

    from engine.features.grads import live_factors
    from engine.features.projection import Projector

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False)),
                           LoraConfig(r=8, lora_alpha=8, target_modules=["0"]))
    x, u = torch.randn(32, 64), torch.randn(64) / 8
    params = dict(model.named_parameters())

    def f(rows):
        return (torch.tanh(model(rows)) * u).sum(-1)

    live = live_factors(model)
    assert len(live) == 1 and ".lora_B." in live[0]
    projector = Projector({n: params[n].numel() for n in live}, 16, seed=0)
    per_example = [torch.autograd.grad(f(x[i:i + 1])[0], [params[n] for n in live]) for i in range(len(x))]
    G = projector.project({n: torch.stack([g[k].flatten() for g in per_example]) for k, n in enumerate(live)})
    f_star = f(x).detach()
    direction = torch.randn(16, generator=torch.Generator().manual_seed(1))
    theta = {n: p.detach().clone() for n, p in params.items()}
    for size in (0.3, 3.0):
        w = direction * size / torch.cat(list(projector.lift(direction).values())).norm()
        with torch.no_grad():
            for name, delta in projector.lift(w).items():
                params[name].add_(delta.view_as(params[name]))
            f_real = f(x)
            for name, value in theta.items():
                params[name].copy_(value)
        denominator = torch.maximum(f_real.abs(), f_star.abs())
        with_gradient = float((((f_star + G @ w - f_real) / denominator) ** 2).mean())
        without = float((((f_star - f_real) / denominator) ** 2).mean())
        assert with_gradient < 0.1 * without, (size, with_gradient, without)


def test_the_store_records_its_factors_and_the_anchor_lifts_only_those(tmp_path):
    """featurize grads at a fresh tiny-Llama LoRA projects the lora_B factors only and says so in
    parameters.json; Anchor.load moves exactly those, and the first-order model holds there."""
    import json

    import polars as pl

    from engine.models.anchor import Anchor

    frame, featurized = _anchor_store(tmp_path)
    record = json.loads((tmp_path / "parameters.json").read_text())
    assert record["projected"] and all(".lora_B." in n for n in record["projected"])
    assert sorted(n.replace(".lora_A.", ".lora_B.") for n in record["fixed"]) == sorted(record["projected"])
    G = torch.tensor(featurized.vectors, dtype=torch.float64)
    f = torch.tensor(featurized.rows["f"].to_numpy(), dtype=torch.float64)
    w = estimator.fit_subsets(G, f, torch.ones(1, len(f), dtype=torch.bool), lam=1e-2).w[0]
    anchor = Anchor(tmp_path)
    encoded = anchor.encode(frame.filter(pl.col("id").is_in(featurized.rows["id"].to_list())))
    a_norm = sum(float(p.norm() ** 2) for n, p in anchor.lora.items() if ".lora_A." in n) ** 0.5
    w = w * 0.1 * a_norm / anchor.load(w)  # a small update: a tenth of the anchor's A factors
    assert anchor.load(w) == pytest.approx(0.1 * a_norm, rel=1e-4)
    assert all(torch.equal(anchor.lora[n], anchor.theta[n]) for n in record["fixed"])
    assert not any(torch.equal(anchor.lora[n], anchor.theta[n]) for n in record["projected"])
    f_real = anchor.scores(encoded).double()
    denominator = torch.maximum(f_real.abs(), f.abs())
    with_gradient = float((((f + G @ w - f_real) / denominator) ** 2).mean())
    without = float((((f - f_real) / denominator) ** 2).mean())
    assert with_gradient < 0.3 * without, (with_gradient, without)
    anchor.reset()
    assert torch.allclose(anchor.scores(encoded).double(), f, atol=1e-5)


def test_a_store_from_another_anchor_is_refused(tmp_path):
    import json

    from engine.models.anchor import Anchor

    _anchor_store(tmp_path, rows=8)
    path = tmp_path / "parameters.json"
    record = json.loads(path.read_text())
    record["projected"].update({name: 1 for name in record["fixed"]})  # as if every factor had been projected
    path.write_text(json.dumps({**record, "fixed": []}))
    with pytest.raises(SiftError, match="the store projected .* rebuild the store"):
        Anchor(tmp_path)
    path.unlink()
    with pytest.raises(SiftError, match="no parameters.json"):
        Anchor(tmp_path)


def test_norm_rescaling_sets_the_lifted_update_to_a_share_of_the_anchor_norm():
    from engine.features.projection import Projector

    G, f, masks = _problem(seed=2)
    projector = Projector({"a.lora_B": 300, "b.lora_B": 120}, G.shape[1], seed=0)
    for method in ("logistic", "gradex"):
        fitting = estimator.Fitting(lam=1e-3, method=method, gradex_c=0.5, update_norm=0.1,
                                    gram=projector.gram(), anchor_norm=4.0)
        W = fitting.solve(torch.tensor(G), torch.tensor(f), torch.tensor(masks[:3]))
        lifted = torch.stack([torch.cat(list(projector.lift(w).values())).norm() for w in W])
        assert torch.allclose(lifted.double(), torch.full((3,), 0.4, dtype=torch.float64), rtol=1e-4)
    with pytest.raises(SiftError, match="update_norm needs"):
        estimator.Fitting(update_norm=0.1).solve(torch.tensor(G), torch.tensor(f), torch.tensor(masks[:1]))


def test_the_update_radius_holds_each_fit_to_the_size_of_a_real_fine_tune():
    """The converged fit sends g . w of every training row towards +infinity: its |w| is many
    times a real fine-tune's |P^T (theta - theta*)|, and its estimates promise about twice the
    improvement the fine-tunes deliver (issue 14). With a radius each w is the trust-region
    optimum: |w| = radius where the free fit lies outside (the KKT condition: the loss's gradient
    points along -w, with a multiplier >= lambda), the free fit where it lies inside, and in the
    small-radius limit the direction of steepest descent at w = 0."""
    G, f, masks = _problem(seed=3)
    G, f, masks = torch.tensor(G), torch.tensor(f), torch.tensor(masks)
    free = estimator.fit_subsets(G, f, masks, lam=1e-3).w
    norms = free.norm(dim=1)
    radius = float(norms.median())
    held = estimator.Fitting(lam=1e-3, radius=radius).solve(G, f, masks)
    outside = norms > radius
    assert outside.any() and (~outside).any()
    assert torch.allclose(held[~outside], free[~outside])
    assert torch.allclose(held[outside].norm(dim=1), torch.full((int(outside.sum()),), radius, dtype=G.dtype), rtol=2e-3)
    M = masks.to(G.dtype)
    p = torch.sigmoid(-(f + held @ G.T))
    loss_grad = -((M * p) @ G) / M.sum(1, keepdim=True)
    cosine = torch.nn.functional.cosine_similarity(loss_grad[outside], -held[outside], dim=1)
    assert (cosine > 1 - 1e-4).all(), cosine
    multiplier = loss_grad[outside].norm(dim=1) / (2 * held[outside].norm(dim=1))
    assert (multiplier >= 1e-3 * (1 - 1e-3)).all()
    tiny = estimator.fit_within(G, f, masks, radius=1e-4, lam=1e-3).w
    gradient_at_zero = -((M * torch.sigmoid(-f)) @ G)
    assert (torch.nn.functional.cosine_similarity(tiny, -gradient_at_zero, dim=1) > 1 - 1e-3).all()
    with pytest.raises(SiftError, match="goes with neither"):
        estimator.Fitting(method="gradex", radius=1.0).solve(G, f, masks[:1])


def test_a_real_update_in_the_estimators_coordinates(tmp_path):
    """Anchor.displacement maps a real fine-tune's theta - theta* to u = P^T (theta - theta*): the
    w of the same first-order effect. |u| is about |theta - theta*| (JL), while lifting a w gives
    |P w| ~ sqrt(D/d) |w|: fitted and real updates compare by |w| against |u|. The first-order
    model at u explains most of what a few real AdamW steps did to f."""
    import numpy as np
    import polars as pl

    from engine.features import objective
    from engine.models.anchor import Anchor

    frame, featurized = _anchor_store(tmp_path, rows=24)
    G = torch.tensor(featurized.vectors, dtype=torch.float64)
    f = torch.tensor(featurized.rows["f"].to_numpy(), dtype=torch.float64)
    anchor = Anchor(tmp_path, threads=1)
    encoded = anchor.encode(frame.filter(pl.col("id").is_in(featurized.rows["id"].to_list())))
    D = sum(anchor.featurizer.projector.sizes.values())
    w = torch.randn(G.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert anchor.load(w) / float(w.norm()) == pytest.approx((D / G.shape[1]) ** 0.5, rel=0.1)
    anchor.reset()
    assert anchor.displacement().norm == 0
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(anchor.trainable(), lr=1e-3, weight_decay=0.0)
    objective.train_steps(anchor.featurizer.score, optimizer, encoded, 3, 8, anchor.pad, np.random.default_rng(0))
    moved = anchor.displacement()
    assert 0 < moved.projected_norm < moved.norm  # A moved too, outside the projected factors
    assert float(moved.projected.norm()) == pytest.approx(moved.projected_norm, rel=0.5)
    f_real = anchor.scores(encoded).double()
    first_order = f + G @ moved.projected
    assert float(((first_order - f_real) ** 2).mean()) < 0.3 * float(((f - f_real) ** 2).mean())

