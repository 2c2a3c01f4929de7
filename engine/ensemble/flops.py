"""FLOPs per stage of the ensemble, the accounting the papers report. Estimates, by formula:

- a forward pass costs 2 N per token (N: the base model's parameters);
- a LoRA training or gradient pass costs 4 N per token: forward, plus the backward through the
  activations; the frozen base weights get no weight gradient and the adapter's are negligible;
- an estimator fit costs about 2 n d per matrix-vector product with the (n, d) gradient matrix,
  NEWTON_STEPS x (CG_STEPS + 2) of them (the batched Newton-CG solver's typical counts);
- serving a label-set query costs M forward passes of its prompt (one per adapter with weight).
"""

from __future__ import annotations

NEWTON_STEPS, CG_STEPS = 10, 20


def forward(params: int, tokens: float) -> float:
    return 2.0 * params * tokens


def train(params: int, tokens: float) -> float:
    return 4.0 * params * tokens


def estimator_fits(fits: int, rows: int, dim: int) -> float:
    return fits * NEWTON_STEPS * (CG_STEPS + 2) * 2.0 * rows * dim


def ridge(rows: int, dim: int) -> float:
    """Normal equations and a Cholesky solve."""
    return 2.0 * rows * dim * dim + dim ** 3 / 3.0
