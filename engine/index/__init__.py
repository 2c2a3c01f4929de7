"""faiss over embeddings: kNN search, k-means (coresets, domains), near-duplicate removal."""

from engine.index.vectors import VectorIndex, kmeans, near_duplicates

__all__ = ["VectorIndex", "kmeans", "near_duplicates"]
