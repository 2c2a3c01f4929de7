"""Data selection, one package per method: pool/ (GOT-D over an unlabeled pool, with its
baselines) and tasks/ (the first-order estimator of which training tasks help a target)."""
