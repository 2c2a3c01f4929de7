"""The adapter ensemble: its manifest, per-label scoring, weights, boosting, FLOPs, evaluation."""
