"""SemDeDup: drop semantic near-duplicates among image embeddings, cluster by cluster.

    keep = semdedup(embeddings, priority, threshold=0.95, clusters=None, seed=0)   # bool [n]

1. The embeddings [n, D] (any float dtype) are L2-normalised in float32 (the scores store them in
   float16, so they are renormalised here).
2. Spherical k-means (faiss) with K clusters (default round(sqrt(n)), at most n): the centroids are
   trained on at most 64 * K samples (faiss draws them with `seed`; 10 iterations), then
   every sample goes to its nearest centroid (largest inner product).
3. Within each cluster the samples are visited in `priority` order (the selection passes: highest
   CLIP score first, ties by key); a sample is kept unless its cosine similarity to a sample
   already kept in the same cluster is above `threshold` (strictly), then it is dropped.

Memory stays bounded: a cluster is processed in blocks of `block` samples, each compared to the
block itself and to the earlier kept samples in blocks (float32 [block, block] matrices), never an
[n, n] matrix. Same inputs, seed and thread count give the same result (faiss's k-means runs on
OpenMP threads).
"""
from __future__ import annotations

import numpy as np

# Training the centroids on 64 samples per centroid (faiss's default is 256) and 10 iterations: dedup
# needs only locality (a near-duplicate pair lies on one side of a boundary almost surely), and the
# assignment of all n samples already costs n * K * D.
MAX_POINTS_PER_CENTROID = 64
NITER = 10


def normalise(embeddings: np.ndarray) -> np.ndarray:
    """[n, D] -> float32 [n, D] with unit rows (zero rows stay zero)."""
    x = np.array(embeddings, dtype=np.float32)  # a copy, normalised in place, in row blocks: one [n, D] buffer
    for start in range(0, len(x), 65536):
        rows = x[start:start + 65536]
        norms = np.sqrt(np.einsum("ij,ij->i", rows, rows))[:, None]
        np.divide(rows, norms, out=rows, where=norms > 0)
    return x


def default_clusters(n: int) -> int:
    """round(sqrt(n)), at least 1."""
    return max(1, int(round(float(np.sqrt(n)))))


def cluster(x: np.ndarray, clusters: int, seed: int = 0, niter: int = NITER,
            max_points_per_centroid: int = MAX_POINTS_PER_CENTROID) -> np.ndarray:
    """Spherical k-means labels of unit rows x [n, D] float32: int64 [n] in [0, K)."""
    import faiss

    n, dim = x.shape
    k = max(1, min(int(clusters), n))
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    kmeans = faiss.Kmeans(dim, k, niter=niter, seed=int(seed) % (2**31), spherical=True, verbose=False,
                          max_points_per_centroid=max_points_per_centroid, min_points_per_centroid=1)
    kmeans.train(np.ascontiguousarray(x))
    index = faiss.IndexFlatIP(dim)
    index.add(kmeans.centroids)
    labels = np.empty(n, dtype=np.int64)
    for start in range(0, n, 65536):
        _, nearest = index.search(np.ascontiguousarray(x[start:start + 65536]), 1)
        labels[start:start + 65536] = nearest[:, 0]
    return labels


def greedy_keep(x: np.ndarray, threshold: float, block: int = 4096) -> np.ndarray:
    """bool [m]: which of the unit rows x [m, D] (in priority order) are kept.

    Row i is dropped when cos(x_i, x_j) > threshold for a kept row j < i.
    """
    m = len(x)
    keep = np.zeros(m, dtype=bool)
    kept_blocks: list[np.ndarray] = []
    for start in range(0, m, block):
        chunk = x[start:start + block]
        alive = np.ones(len(chunk), dtype=bool)
        for kept in kept_blocks:
            rows = np.flatnonzero(alive)
            if rows.size:
                alive[rows] = (chunk[rows] @ kept.T).max(axis=1) <= threshold
        conflict = np.triu(chunk @ chunk.T > threshold, k=1)  # [b, b]: row i would drop the later j
        for i in np.flatnonzero(conflict.any(axis=1)):  # only rows with a later near-duplicate need a visit
            if alive[i]:
                alive &= ~conflict[i]
        keep[start:start + len(chunk)] = alive
        if alive.any():
            kept_blocks.append(np.ascontiguousarray(chunk[alive]))
    return keep


def semdedup(embeddings: np.ndarray, priority: np.ndarray, threshold: float, clusters: int | None = None,
             seed: int = 0, block: int = 4096) -> tuple[np.ndarray, int]:
    """(keep bool [n], K used). embeddings [n, D]; priority: a permutation of range(n), first = kept first."""
    n = len(embeddings)
    if n == 0:
        return np.zeros(0, dtype=bool), 0
    x = normalise(embeddings)
    k = max(1, min(default_clusters(n) if clusters is None else int(clusters), n))
    labels = cluster(x, k, seed=seed)
    # Group by cluster, keeping priority order inside each group (stable sort).
    ordered = np.asarray(priority, dtype=np.int64)
    ordered = ordered[np.argsort(labels[ordered], kind="stable")]
    bounds = np.flatnonzero(np.diff(labels[ordered])) + 1
    keep = np.zeros(n, dtype=bool)
    for members in np.split(ordered, bounds):
        keep[members] = greedy_keep(x[members], threshold, block)
    return keep, k
