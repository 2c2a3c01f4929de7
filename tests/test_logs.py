"""Quiet by default: what Ray's driver thread and Ray Tune print to the terminal goes to the run's
log file instead (sift's own lines stay), and --verbose leaves it on the terminal."""

from __future__ import annotations

from engine import logs


def _trial(config: dict) -> None:
    from ray import tune

    tune.report({"score": config["x"]})


def test_a_quiet_run_sends_ray_and_tune_output_to_the_log_file(ray_session, tmp_path, capsys):
    from ray import tune
    from ray._private import worker

    path = logs.setup(str(tmp_path), "quiet", verbose=False)
    try:
        # What the cluster pushes to the driver (e.g. the raylet's worker start-up warning).
        worker.print_to_stdstream({"lines": ["WARNING: 8 PYTHON worker processes have been started"],
                                   "pid": "raylet", "is_err": False}, ignore_prefix=False)
        tuner = tune.Tuner(_trial, param_space={"x": tune.grid_search([1, 2])},
                           run_config=tune.RunConfig(name="quiet", storage_path=str(tmp_path / "tune"), verbose=0))
        assert sorted(r.metrics["score"] for r in tuner.fit()) == [1, 2]
    finally:
        logs.setup(None, "verbose", verbose=True)
    out = capsys.readouterr()
    for noise in ("8 PYTHON worker processes", "Configuration for experiment", "View detailed results", "TensorBoard"):
        assert noise not in out.out + out.err, noise
    assert "8 PYTHON worker processes" in path.read_text()
    assert out.out.splitlines() == [f"logs of Ray and the model libraries: {path}"]

    worker.print_to_stdstream({"lines": ["shown when verbose"], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    assert "shown when verbose" in capsys.readouterr().out


def test_a_quiet_run_loads_models_without_their_progress_bars(tmp_path, capsys):
    from engine.models import builtin, load

    logs.setup(str(tmp_path), "quiet", verbose=False)
    try:
        load.load_causal_lm(builtin.resolve("tiny-llama"))
    finally:
        logs.setup(None, "verbose", verbose=True)
    assert "Loading weights" not in capsys.readouterr().err
