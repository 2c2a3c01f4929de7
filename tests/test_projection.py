"""The seeded projection: reproducible anywhere, adjoint-exact, never dense."""

import math

import torch

from engine.features.projection import CHUNK_ROWS, Projector

SIZES = {"layer.0.lora_A": 3 * CHUNK_ROWS // 2, "layer.0.lora_B": 700, "layer.1.lora_A": 50}


def _grads(b: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(b, k, generator=g) for n, k in SIZES.items()}


def test_same_seed_same_projection_whatever_the_sharding_or_cache():
    grads = _grads(6)
    whole = Projector(SIZES, 64, seed=5).project(grads)
    no_cache = Projector(SIZES, 64, seed=5, cache_mb=0)
    halves = torch.cat([no_cache.project({n: g[:2] for n, g in grads.items()}),
                        no_cache.project({n: g[2:] for n, g in grads.items()})])
    # P itself is bit-identical; products differ only by float summation order (BLAS blocking)
    assert all(torch.equal(no_cache.block(n), Projector(SIZES, 64, seed=5).block(n)) for n in SIZES)
    assert torch.allclose(whole, halves, rtol=1e-5, atol=1e-4)
    # a worker that projects only some parameters generates the same blocks for them
    subset = Projector({"layer.1.lora_A": 50}, 64, seed=5)
    assert torch.equal(subset.block("layer.1.lora_A"), Projector(SIZES, 64, seed=5).block("layer.1.lora_A"))
    assert not torch.equal(whole, Projector(SIZES, 64, seed=6).project(grads))


def test_adjoint_identity():
    proj = Projector(SIZES, 32, seed=1)
    grads = _grads(3, seed=2)
    w = torch.randn(32, generator=torch.Generator().manual_seed(3))
    lhs = proj.project(grads) @ w  # <P^T g, w>
    lifted = proj.lift(w)
    rhs = sum(grads[n] @ lifted[n] for n in SIZES)  # <g, P w>
    assert torch.allclose(lhs, rhs, rtol=1e-4, atol=1e-4)


def test_entries_are_rademacher_and_norms_roughly_kept():
    proj = Projector(SIZES, 400, seed=0)
    block = proj.block("layer.0.lora_B")
    assert set(block.unique().tolist()) == {-1.0, 1.0}
    assert abs(block.mean().item()) < 0.01
    assert proj.scale == 1 / math.sqrt(400)
    grads = _grads(20, seed=4)
    full = torch.cat([grads[n] for n in SIZES], dim=1).norm(dim=1)
    ratio = proj.project(grads).norm(dim=1) / full
    assert ((ratio - 1).abs() < 0.2).all(), ratio


def test_gram_gives_the_lifted_norm():
    proj = Projector(SIZES, 16, seed=2)
    W = torch.randn(3, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    lifted = [torch.cat(list(proj.lift(w).values())).double().norm() for w in W]
    via_gram = ((W @ proj.gram()) * W).sum(1).sqrt()
    assert torch.allclose(via_gram, torch.stack(lifted), rtol=1e-5)
