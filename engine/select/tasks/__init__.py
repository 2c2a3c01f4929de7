"""The first-order estimator: subset fits (estimator.py), task gradients and searches (subsets.py,
tune.py), its check against real fine-tunes (calibrate.py), `sift select-tasks` (select.py)."""
