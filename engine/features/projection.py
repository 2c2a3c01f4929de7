"""A seeded Rademacher projection P (D x d, entries +-1/sqrt(d)) that is never built densely.

P is split by parameter: the rows of P that multiply parameter `name` are generated in chunks
from (seed, name, chunk index) alone. So the same seed gives the same P on any worker or
machine, whatever the sharding, batch size or set of other parameters; and a worker only ever
holds the blocks of the parameters it projects (cached up to a memory budget).

`project(g) = P^T g` maps gradients to d dims; `lift(w) = P w` maps a solution back to
parameter space, with <P^T g, w> = <g, P w> exactly; `gram()` = P^T P gives |P w| without lifting.
"""

from __future__ import annotations

import hashlib
import math

import torch

CHUNK_ROWS = 8192


class Projector:
    def __init__(self, sizes: dict[str, int], dim: int, seed: int, cache_mb: float = 2048,
                 device: torch.device | str = "cpu"):
        if dim < 1:
            raise ValueError(f"projection dim must be >= 1, got {dim}")
        self.sizes = dict(sizes)
        self.dim = dim
        self.seed = seed
        self.scale = 1.0 / math.sqrt(dim)
        self.device = torch.device(device)
        self._cache: dict[str, torch.Tensor] = {}
        self._budget = cache_mb * 2**20

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    def block(self, name: str) -> torch.Tensor:
        """The +-1 rows of P for parameter `name` (unscaled), shape (numel, dim), float32."""
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        rows = self.sizes[name]
        signs = torch.empty(rows, self.dim, dtype=torch.int8)
        for chunk, start in enumerate(range(0, rows, CHUNK_ROWS)):
            stop = min(start + CHUNK_ROWS, rows)
            generator = torch.Generator().manual_seed(_chunk_seed(self.seed, name, chunk))
            signs[start:stop] = torch.randint(0, 2, (stop - start, self.dim), generator=generator, dtype=torch.int8)
        block = (signs.to(self.device, torch.float32) * 2 - 1)
        used = sum(t.numel() * 4 for t in self._cache.values())
        if used + block.numel() * 4 <= self._budget:
            self._cache[name] = block
        return block

    def project(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-example gradients {name: (b, numel)} -> (b, dim) = G P."""
        out = None
        for name, g in grads.items():
            part = g.reshape(g.shape[0], -1).to(self.device, torch.float32) @ self.block(name)
            out = part if out is None else out + part
        if out is None:
            raise ValueError("no gradients to project")
        return out * self.scale

    def lift(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """A d-dim solution -> parameter space {name: (numel,)} = P w."""
        w = w.to(self.device, torch.float32)
        return {name: (self.block(name) @ w) * self.scale for name in self.sizes}

    def gram(self) -> torch.Tensor:
        """P^T P (d, d), float64, block by block: |P w|^2 = w^T (P^T P) w for many w at once."""
        out = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        for name in self.sizes:
            block = self.block(name).double().cpu()
            out += block.T @ block
        return out * self.scale ** 2


def _chunk_seed(seed: int, name: str, chunk: int) -> int:
    digest = hashlib.blake2b(f"{seed}\x1f{name}\x1f{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
