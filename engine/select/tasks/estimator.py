"""The first-order estimator (docs/ALGORITHMS.md section 2): how would a LoRA fine-tuned on a subset
of the training data do, without training it?

Around the anchor theta*, an example's output is f_i(theta* + P w) ~ f*_i + g_i . w with g_i its
projected gradient. Fine-tuning on subset S is then the offset logistic regression

    w_S = argmin_w  mean_{i in S} log(1 + exp(-(f*_i + g_i . w))) + lambda ||w||^2,

and its quality on a target is read off f*_val + g_val . w_S: pure linear algebra. With a radius
R (`fit_within`) the fit is held to |w_S| <= R: the size of the real fine-tune it stands for.

`fit_subsets` solves many subsets at once: a batched Newton method whose steps come from
conjugate gradients on Hessian-vector products (each a pair of matrix products over the whole
stack of subsets), with a batched Armijo line search. `fit_subsets_reference` is the plain
per-subset scipy L-BFGS loop it must agree with. The GradEx variant (EMNLP code) is the same
problem with f* = 0 and lambda = 1 / (2 C n), whose solution is rescaled to a given norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from engine.errors import SiftError


@dataclass
class Fit:
    w: torch.Tensor  # (S, d)
    iterations: int
    grad_norm: torch.Tensor  # (S,) final gradient norms
    converged: torch.Tensor  # (S,) bool


def _objective(G, f, M, counts, W, lam):
    z = f + W @ G.T  # (S, n)
    return (M * torch.nn.functional.softplus(-z)).sum(1) / counts + lam * (W * W).sum(1)


def fit_subsets(G: torch.Tensor, f: torch.Tensor, masks: torch.Tensor, lam: float | torch.Tensor = 1e-3,
                max_newton: int = 30, max_cg: int = 50, tol: float = 1e-6, start: torch.Tensor | None = None) -> Fit:
    """w for every subset: G (n, d) projected gradients, f (n,) anchor outputs, masks (S, n) bool;
    `lam` one value or one per subset (S,); `start` (S, d) a warm start (default w = 0)."""
    lam = torch.as_tensor(lam, dtype=G.dtype)
    if (lam <= 0).any():
        raise SiftError(f"lambda must be > 0 (it keeps the fit well-posed), got {lam.min().item()}")
    # In blocks: torch.isfinite makes an (n, d) mask, as large as the gradients themselves.
    if not (all(torch.isfinite(G[i:i + 65_536]).all() for i in range(0, len(G), 65_536)) and torch.isfinite(f).all()):
        raise SiftError("gradient features contain NaN or infinite values; rebuild the store")
    M = masks.to(G.dtype)
    counts = M.sum(1)
    if (counts == 0).any():
        raise SiftError(f"{int((counts == 0).sum())} subset(s) hold no training rows")
    S, d = M.shape[0], G.shape[1]
    lam = lam.expand(S)
    W = torch.zeros(S, d, dtype=G.dtype) if start is None else start.to(G.dtype).clone()
    done = torch.zeros(S, dtype=torch.bool)
    grad_norm = torch.full((S,), float("inf"), dtype=G.dtype)
    for iteration in range(1, max_newton + 1):
        z = f + W @ G.T
        p = torch.sigmoid(-z)  # -(d/dz) softplus(-z)
        grad = -((M * p) @ G) / counts[:, None] + 2 * lam[:, None] * W
        grad_norm = grad.norm(dim=1)
        done = grad_norm <= tol * (1 + W.norm(dim=1))
        if done.all():
            break
        h = M * p * (1 - p) / counts[:, None]  # curvature weights (S, n)

        def hvp(V: torch.Tensor) -> torch.Tensor:
            return (h * (V @ G.T)) @ G + 2 * lam[:, None] * V

        step = _batched_cg(hvp, grad, max_cg, tol=1e-10)
        step[done] = 0
        W = _line_search(G, f, M, counts, W, step, grad, lam)
    return Fit(W, iteration, grad_norm, done)


def fit_within(G: torch.Tensor, f: torch.Tensor, masks: torch.Tensor, radius: float | torch.Tensor, lam: float = 1e-3,
               rtol: float = 1e-3, max_steps: int = 60) -> Fit:
    """w for every subset, its norm held to |w| <= radius (a trust region): the regularised fit
    where it lies inside, else the fit with the larger lambda_s that puts it on the sphere
    (|w(lambda)| falls as lambda grows, so a root search on log lambda_s per subset finds it).

    Why: minimised to convergence, the fit keeps raising g . w of every training row until lambda
    stops it: it stands for a fine-tune run far past a real budget (steps x lr), and on the suite
    its estimates promised about twice the improvement the real fine-tunes delivered (issue 14).
    Held to a radius, an estimate stands for a fine-tune that got only so far. The radius is in
    the estimator's coordinates (a real update's u = P^T (theta - theta*), `Anchor.displacement`)
    and is measured by `sift estimate --calibrate` (calibrate._progress_radii). As the
    radius shrinks, w turns to the direction of the loss's steepest descent at w = 0. `radius` is
    one value or one per subset (S,)."""
    radius = torch.as_tensor(radius, dtype=G.dtype).expand(masks.shape[0])
    if (radius <= 0).any():
        raise SiftError(f"the update radius must be > 0, got {radius.min().item()}")
    fit = fit_subsets(G, f, masks, lam)
    outside = fit.w.norm(dim=1) > radius * (1 + rtol)
    if not outside.any():
        return fit
    inner, radius = masks[outside], radius[outside]
    M = inner.to(G.dtype)
    slope = ((M * torch.sigmoid(-f)) @ G).norm(dim=1) / M.sum(1)  # |grad L_S(0)|
    # |w(lambda)| <= |grad L_S(0)| / (2 lambda) (2 lambda-strong convexity): the sphere lies below hi.
    lo = torch.full((len(M),), float(np.log(lam)), dtype=G.dtype)
    hi = torch.maximum(lo, (slope / (2 * radius)).log()) + 1e-9
    best = fit_subsets(G, f, inner, hi.exp(), start=fit.w[outside])  # per subset, the latest fit inside
    # psi(t) = log |w(e^t)| - log radius falls from > 0 at lo to <= 0 at hi: false position with the
    # Illinois halving (the side kept twice in a row has its psi halved) finds its root in a few fits.
    psi_lo = fit.w[outside].norm(dim=1).log() - radius.log()
    psi_hi = best.w.norm(dim=1).clamp_min(1e-300).log() - radius.log()
    kept = torch.zeros(len(M), dtype=torch.long)  # +1: lo moved last, -1: hi moved last
    last = best
    for _ in range(max_steps):
        if (best.w.norm(dim=1) >= radius * (1 - rtol)).all() or (hi - lo).max() < 1e-12:
            break
        t = (lo * psi_hi - hi * psi_lo) / (psi_hi - psi_lo)
        t = torch.where(torch.isfinite(t) & (t > lo) & (t < hi), t, (lo + hi) / 2)
        last = fit_subsets(G, f, inner, t.exp(), start=last.w)
        psi = last.w.norm(dim=1).clamp_min(1e-300).log() - radius.log()
        big = psi > 0
        psi_hi = torch.where(big & (kept == 1), psi_hi / 2, psi_hi)
        psi_lo = torch.where(~big & (kept == -1), psi_lo / 2, psi_lo)
        lo, psi_lo = torch.where(big, t, lo), torch.where(big, psi, psi_lo)
        hi, psi_hi = torch.where(big, hi, t), torch.where(big, psi_hi, psi)
        kept = torch.where(big, torch.ones_like(kept), -torch.ones_like(kept))
        best = Fit(torch.where(big[:, None], best.w, last.w), max(best.iterations, last.iterations),
                   torch.where(big, best.grad_norm, last.grad_norm), torch.where(big, best.converged, last.converged))
    w, grad_norm, converged = fit.w.clone(), fit.grad_norm.clone(), fit.converged.clone()
    w[outside], grad_norm[outside], converged[outside] = best.w, best.grad_norm, best.converged
    return Fit(w, max(fit.iterations, best.iterations), grad_norm, converged)


def _batched_cg(hvp, B: torch.Tensor, iters: int, tol: float) -> torch.Tensor:
    """Solve A_s x_s = b_s for every row s at once (A_s symmetric positive definite)."""
    X = torch.zeros_like(B)
    R = B.clone()
    P = R.clone()
    rs = (R * R).sum(1)
    stop = tol * (B * B).sum(1).clamp_min(1e-300)
    for _ in range(iters):
        active = rs > stop
        if not active.any():
            break
        AP = hvp(P)
        alpha = torch.where(active, rs / (P * AP).sum(1).clamp_min(1e-300), torch.zeros_like(rs))
        X += alpha[:, None] * P
        R -= alpha[:, None] * AP
        rs_new = (R * R).sum(1)
        beta = torch.where(active, rs_new / rs.clamp_min(1e-300), torch.zeros_like(rs))
        P = R + beta[:, None] * P
        rs = rs_new
    return X


def _line_search(G, f, M, counts, W, step, grad, lam, shrink: float = 0.5, tries: int = 20):
    """Backtracking (Armijo) per subset: full Newton steps where they decrease the loss enough."""
    base = _objective(G, f, M, counts, W, lam)
    slope = -(grad * step).sum(1)
    t = torch.ones(W.shape[0], dtype=W.dtype)
    accepted = torch.zeros(W.shape[0], dtype=torch.bool)
    for _ in range(tries):
        trial = W - t[:, None] * step
        ok = _objective(G, f, M, counts, trial, lam) <= base + 1e-4 * t * slope
        accepted |= ok
        if accepted.all():
            break
        t = torch.where(accepted, t, t * shrink)
    t = torch.where(accepted, t, torch.zeros_like(t))
    return W - t[:, None] * step


def fit_subsets_reference(G: np.ndarray, f: np.ndarray, masks: np.ndarray, lam: float = 1e-3) -> np.ndarray:
    """One scipy L-BFGS fit per subset: the slow, obviously-correct path."""
    from scipy.optimize import minimize

    out = np.zeros((len(masks), G.shape[1]))
    for s, mask in enumerate(masks):
        Gs, fs = G[mask], f[mask]

        def loss(w, Gs=Gs, fs=fs):
            z = fs + Gs @ w
            p = 1 / (1 + np.exp(z))
            return np.logaddexp(0, -z).mean() + lam * w @ w, -(p @ Gs) / len(fs) + 2 * lam * w

        out[s] = minimize(loss, np.zeros(G.shape[1]), jac=True, method="L-BFGS-B",
                          options={"maxiter": 1000, "gtol": 1e-10, "ftol": 1e-15}).x
    return out


def gradex_fit(G: torch.Tensor, masks: torch.Tensor, C: float = 1e-4, norm: float | None = None) -> torch.Tensor:
    """The GradEx variant: logistic regression raising every g_i . w (random signs only give
    sklearn two classes), C as in sklearn, optionally rescaled to a norm in parameter space."""
    counts = masks.sum(1).to(G.dtype)
    W = torch.stack([
        fit_subsets(G, torch.zeros(G.shape[0], dtype=G.dtype), masks[s:s + 1], lam=float(1 / (2 * C * counts[s]))).w[0]
        for s in range(masks.shape[0])
    ])
    if norm is not None:
        W = W * (norm / W.norm(dim=1, keepdim=True).clamp_min(1e-300))
    return W


@dataclass
class Fitting:
    """How a subset's w is fitted: the offset logistic model (`lam`), held to |w| <= `radius`
    when one is given (the size of the real fine-tune it stands for: `fit_within`), or the EMNLP
    code's GradEx variant (f* = 0, sklearn's C); optionally every update rescaled to
    |P w| = update_norm x the anchor adapter's norm (the EMNLP code used 0.02-0.5), which needs
    the store's P^T P."""

    lam: float = 1e-3
    method: Literal["logistic", "gradex"] = "logistic"
    gradex_c: float = 1e-4
    update_norm: float | None = None
    gram: torch.Tensor | None = None  # P^T P (d, d)
    anchor_norm: float | None = None
    radius: float | None = None

    def solve(self, G: torch.Tensor, f: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """(S, d) w for masks (S, n) of training rows."""
        if self.radius is not None and (self.method != "logistic" or self.update_norm is not None):
            raise SiftError("the update radius holds the logistic fit's |w|; it goes with neither "
                            "method=gradex nor update_norm")
        if self.method == "gradex":
            W = gradex_fit(G, masks, C=self.gradex_c)
        elif self.radius is not None:
            W = fit_within(G, f, masks, self.radius, lam=self.lam).w
        else:
            W = fit_subsets(G, f, masks, lam=self.lam).w
        if self.update_norm is None:
            return W
        if self.gram is None or self.anchor_norm is None:
            raise SiftError("update_norm needs the gradient store's projection (P^T P) and anchor norm")
        lifted = ((W @ self.gram.to(W.dtype)) * W).sum(1).clamp_min(0).sqrt()
        return W * (self.update_norm * self.anchor_norm / lifted.clamp_min(1e-300))[:, None]


def gradex_reference(G: np.ndarray, mask: np.ndarray, C: float = 1e-4, seed: int = 0) -> np.ndarray:
    """sklearn's LogisticRegression on sign-flipped rows, as the EMNLP code did."""
    from sklearn.linear_model import LogisticRegression

    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=int(mask.sum()))
    model = LogisticRegression(C=C, fit_intercept=False, tol=1e-10, max_iter=10_000)
    model.fit(G[mask] * signs[:, None], (signs > 0).astype(int))
    return model.coef_[0]


@dataclass
class LabelRows:
    """Evaluation rows scored against every label of their task, for accuracy by argmax over the
    label set: the anchor's output f*_{i,c} with class c's label as the answer, and its projected
    gradient. Classes are (task, label) pairs; a row's columns outside its task are -inf."""

    f: torch.Tensor  # (n, C)
    G: torch.Tensor  # (n, C, d)
    gold: torch.Tensor  # (n,) column of the row's gold label
    task_of_class: torch.Tensor  # (C,) index of each class's task


@dataclass
class Scores:
    loss: torch.Tensor  # (S,) mean logistic loss softplus(-f) of the gold answer on the evaluation rows
    accuracy: torch.Tensor | None  # (S,) argmax over the task's labels is the gold one (None: no LabelRows)
    macro_f1: torch.Tensor | None  # (S,) per task, the mean F1 over its labels; then the mean over tasks


def linearised_scores(W: torch.Tensor, G_eval: torch.Tensor, f_eval: torch.Tensor,
                      labels: LabelRows | None = None) -> Scores:
    """Quality of each fitted w on evaluation rows, from f*_val + g_val . w alone (per label too)."""
    z = f_eval + W @ G_eval.T
    loss = torch.nn.functional.softplus(-z).mean(1)
    if labels is None:
        return Scores(loss, None, None)
    per_label = labels.f + torch.einsum("ncd,sd->snc", labels.G.to(W.dtype), W)
    accuracy, macro_f1 = label_metrics(per_label, labels.gold, labels.task_of_class)
    return Scores(loss, accuracy, macro_f1)


def label_metrics(scores: torch.Tensor, gold: torch.Tensor, task_of_class: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Accuracy and macro-F1 of argmax predictions: scores (S, n, C), gold (n,) -> (S,), (S,).
    Macro-F1 as sklearn's: per task, the mean F1 over the labels that occur as gold or predicted;
    then the mean over tasks."""
    classes = scores.shape[-1]
    pred = scores.argmax(-1)  # (S, n)
    accuracy = (pred == gold).to(scores.dtype).mean(1)
    predicted = torch.nn.functional.one_hot(pred, classes).to(scores.dtype)  # (S, n, C)
    actual = torch.nn.functional.one_hot(gold, classes).to(scores.dtype)  # (n, C)
    tp = (predicted * actual).sum(1)
    denominator = predicted.sum(1) + actual.sum(0)  # 2 tp + fp + fn
    f1 = torch.where(denominator > 0, 2 * tp / denominator.clamp_min(1), torch.zeros_like(tp))
    per_task = []
    for t in task_of_class.unique():
        members = task_of_class == t
        present = (denominator[:, members] > 0).to(scores.dtype)
        per_task.append((f1[:, members] * present).sum(1) / present.sum(1).clamp_min(1))
    return accuracy, torch.stack(per_task).mean(0)
