"""Similar-image search (Krizhevsky & Hinton 2011) on Fashion-MNIST: precision at k of retrieval by
autoencoder code distance, by Hamming distance between thresholded codes of several bit counts,
by PCA sign codes, and by pixel distance.

Run:
    python -m experiments.repro_retrieval --workdir=runs/repro_retrieval [--quick]

Queries are the test images, the database the training images, and a retrieved image is relevant
when it has the query's label. Writes results.json and precision.png, neighbours.png in the
workdir; the table is in experiments/results/retrieval.md.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from aejax import pca
from aejax.runtime.config import default_config
from experiments import probes


def squared_euclidean(queries: jax.Array, database: jax.Array) -> jax.Array:
    """Squared Euclidean distances ``(Q, N)`` by one matmul."""
    q2 = jnp.sum(queries * queries, axis=1, keepdims=True)
    d2 = jnp.sum(database * database, axis=1)
    return jnp.maximum(q2 + d2[None] - 2.0 * queries @ database.T, 0.0)


def hamming(queries: jax.Array, database: jax.Array) -> jax.Array:
    """Hamming distances ``(Q, N)`` between 0/1 codes by one matmul (exact in float32 below 2^24
    bits)."""
    q = queries.astype(jnp.float32)
    d = database.astype(jnp.float32)
    return q.sum(1, keepdims=True) + d.sum(1)[None] - 2.0 * q @ d.T


DISTANCES = {"euclidean": squared_euclidean, "hamming": hamming}


def _precision_chunk(dist: jax.Array, relevant: jax.Array, ks: Sequence[int]) -> jax.Array:
    """Expected precision at each k ``(Q, len(ks))`` when ties are broken uniformly at random.

    With ``t`` the k-th smallest distance, the items closer than ``t`` are all retrieved and the
    remaining slots are filled from the items at distance exactly ``t``; the expected number of
    relevant items among those is proportional. Hamming distances tie a lot; this makes the
    answer independent of the database's order.
    """
    kmax = max(ks)
    smallest = -jax.lax.top_k(-dist, kmax)[0]  # (Q, kmax), ascending
    out = []
    for k in ks:
        t = smallest[:, k - 1:k]
        less, equal = dist < t, dist == t
        n_less = less.sum(1)
        r_less = (less & relevant).sum(1)
        n_eq = equal.sum(1)
        r_eq = (equal & relevant).sum(1)
        out.append((r_less + (k - n_less) * r_eq / n_eq) / k)
    return jnp.stack(out, axis=1)


def precision_at_k(queries: np.ndarray, query_labels: np.ndarray, database: np.ndarray,
                   database_labels: np.ndarray, ks: Sequence[int] = (1, 10, 100), *,
                   distance: str = "euclidean", chunk_size: int = 500) -> dict[int, float]:
    """Mean precision at each k over the queries: the fraction of the k nearest database items
    that share the query's label (ties at the k-th distance broken uniformly at random, in
    expectation).

    Args:
      queries: ``(Q, D)`` features (0/1 codes for ``distance="hamming"``).
      query_labels: ``(Q,)``.
      database: ``(N, D)``.
      database_labels: ``(N,)``.
      ks: cut-offs, each in ``[1, N]``.
      distance: ``"euclidean"`` or ``"hamming"``.
      chunk_size: queries per jitted call (the distance block is ``chunk_size * N``).

    Returns:
      ``{k: precision}``.
    """
    if distance not in DISTANCES:
        raise ValueError(f"Unknown distance {distance!r}; choose one of {sorted(DISTANCES)}.")
    if queries.ndim != 2 or database.ndim != 2 or queries.shape[1] != database.shape[1]:
        raise ValueError(f"precision_at_k: queries (Q, D) and database (N, D) must share D; got "
                         f"{queries.shape} and {database.shape}.")
    ks = tuple(int(k) for k in ks)
    if not all(1 <= k <= len(database) for k in ks):
        raise ValueError(f"precision_at_k: every k must lie in [1, {len(database)}], got {ks}.")
    dist_fn = DISTANCES[distance]
    # The database is an argument, not a closed-over constant: XLA would fold it into the program.
    db = jnp.asarray(database, jnp.float32)
    db_labels = jnp.asarray(database_labels)

    # Two programs: the thresholds are compared with ``==`` against the distances they were taken
    # from, so the distances must be one buffer. Inside one program XLA may fuse the distance
    # computation into each of its users and round it differently in each (then a threshold
    # equals no distance and the tie share is 0 / 0).
    distances = jax.jit(dist_fn)
    precision = jax.jit(lambda dist, ql, db_labels: _precision_chunk(
        dist, ql[:, None] == db_labels[None], ks))

    def chunk(q, ql, db, db_labels):
        return precision(distances(q, db), ql, db_labels)

    sums = np.zeros(len(ks))
    for i in range(0, len(queries), chunk_size):
        q = jnp.asarray(queries[i:i + chunk_size], jnp.float32)
        ql = jnp.asarray(query_labels[i:i + chunk_size])
        sums += np.asarray(chunk(q, ql, db, db_labels)).sum(0)
    return {k: float(s / len(queries)) for k, s in zip(ks, sums)}


def nearest(queries: np.ndarray, database: np.ndarray, k: int, *, distance: str = "euclidean",
            chunk_size: int = 500) -> np.ndarray:
    """Indices ``(Q, k)`` of the k nearest database items (ties: lowest index first)."""
    dist_fn = DISTANCES[distance]
    db = jnp.asarray(database, jnp.float32)
    fn = jax.jit(lambda q, db: jax.lax.top_k(-dist_fn(q, db), k)[1])
    return np.concatenate([np.asarray(fn(jnp.asarray(queries[i:i + chunk_size], jnp.float32), db))
                           for i in range(0, len(queries), chunk_size)])


def binary_codes(codes: np.ndarray, threshold: str | float = 0.5,
                 reference: np.ndarray | None = None) -> np.ndarray:
    """0/1 codes: ``codes > threshold``, or ``> the per-unit median of reference`` for "median"."""
    if threshold == "median":
        med = np.median(codes if reference is None else reference, axis=0)
        return (codes > med).astype(np.uint8)
    return (codes > float(threshold)).astype(np.uint8)


def retrieval_config(bits: int, *, epochs: int, seed: int = 0, train_examples: int = 0):
    """784-256-64-bits ReLU encoder with a sigmoid code, BCE, Adam 1e-3."""
    c = default_config()
    c.seed = seed
    c.data.train_examples = train_examples
    c.model.update(hidden=(256, 64), code_size=bits, activation="relu", code_activation="sigmoid")
    c.num_epochs = epochs
    c.progress = False
    c.figures = False
    c.pca_baseline = False
    c.keep_checkpoints = 1
    c.checkpoint_every_steps = 10**9
    return c


def plot_precision(results: dict, ks: Sequence[int], path: str) -> str:
    from aejax import figures  # noqa: F401  (headless backend)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.4, 3.4))
    ax.plot(ks, [results["pixels"][str(k)] for k in ks], "k-o", label="pixels (Euclidean)")
    styles = {"real": "-", "binary_0.5": "--", "pca_sign": ":"}
    names = {"real": "AE code, Euclidean", "binary_0.5": "AE code > 0.5, Hamming",
             "pca_sign": "PCA > median, Hamming"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, bits in enumerate(results["bits"]):
        for key, ls in styles.items():
            r = results["codes"][str(bits)][key]
            ax.plot(ks, [r[str(k)] for k in ks], ls, marker=".", color=colors[i % len(colors)],
                    label=f"{bits} bits: {names[key]}")
    ax.set_xscale("log")
    ax.set_xlabel("k (retrieved training images)")
    ax.set_ylabel("precision at k (same label)")
    ax.set_title("Fashion-MNIST test queries against the training set", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def run(workdir: str, *, bits: Sequence[int], epochs: int, num_queries: int,
        train_examples: int = 0, ks: Sequence[int] = (1, 10, 100), seed: int = 0) -> dict:
    """Trains one autoencoder per bit count (resumable workdirs), measures retrieval, writes
    results.json."""
    t0 = time.time()
    splits = probes.fashion()
    (x_db, y_db), _, (x_te, y_te) = splits
    if train_examples:
        x_db, y_db = x_db[:train_examples], y_db[:train_examples]
    rng = np.random.default_rng(seed)
    q_idx = np.sort(rng.choice(len(x_te), num_queries, replace=False))
    x_q, y_q = x_te[q_idx], y_te[q_idx]

    def as_str_keys(p):
        return {str(k): v for k, v in p.items()}

    t = time.time()
    results = {"bits": list(bits), "ks": list(ks),
               "pixels": as_str_keys(precision_at_k(x_q, y_q, x_db, y_db, ks)), "codes": {}}
    results["pixels_seconds"] = round(time.time() - t, 1)
    neighbours = {"pixels": nearest(x_q[:8], x_db, 8)}
    for b in bits:
        t = time.time()
        config = retrieval_config(b, epochs=epochs, seed=seed, train_examples=train_examples)
        model, params, summary = probes.train_model(config, os.path.join(workdir, f"bits{b}"),
                                                    splits)
        train_seconds = time.time() - t
        t = time.time()
        z_db, z_q = probes.encode(model, params, x_db), probes.encode(model, params, x_q)
        bin_db, bin_q = binary_codes(z_db, 0.5), binary_codes(z_q, 0.5)
        med_db, med_q = binary_codes(z_db, "median"), binary_codes(z_q, "median", reference=z_db)
        fitted = pca.fit(x_db, b)
        p_db, p_q = np.asarray(pca.encode(fitted, x_db)), np.asarray(pca.encode(fitted, x_q))
        pca_db, pca_q = binary_codes(p_db, "median"), binary_codes(p_q, "median", reference=p_db)
        r = {
            "real": as_str_keys(precision_at_k(z_q, y_q, z_db, y_db, ks)),
            "binary_0.5": as_str_keys(precision_at_k(bin_q, y_q, bin_db, y_db, ks,
                                                     distance="hamming")),
            "binary_median": as_str_keys(precision_at_k(med_q, y_q, med_db, y_db, ks,
                                                        distance="hamming")),
            "pca_sign": as_str_keys(precision_at_k(pca_q, y_q, pca_db, y_db, ks,
                                                   distance="hamming")),
            # How binary the sigmoid code already is: the fraction of units within 0.1 of 0 or 1.
            "code_fraction_saturated": float(np.mean((z_db < 0.1) | (z_db > 0.9))),
            "bits_on_fraction": float(bin_db.mean()),
            "distinct_binary_codes": int(len(np.unique(np.packbits(bin_db, axis=1), axis=0))),
            "test_squared_error_per_image": summary["test"]["squared_error_per_image"],
            "train_seconds": round(train_seconds, 1),
            "retrieval_seconds": round(time.time() - t, 1),
        }
        results["codes"][str(b)] = r
        neighbours[f"{b}-bit Hamming"] = nearest(bin_q[:8], bin_db, 8, distance="hamming")
        print(b, {k: r[k] for k in ("real", "binary_0.5", "pca_sign")}, flush=True)
    results["pixels"]["note"] = "Euclidean distance between raw pixel vectors"
    figures = [plot_precision(results, ks, os.path.join(workdir, "precision.png")),
               plot_neighbours(x_q[:8], x_db, neighbours, os.path.join(workdir, "neighbours.png"))]
    out = {"setting": dict(bits=list(bits), epochs=epochs, num_queries=num_queries,
                           database_size=len(x_db), seed=seed, dataset="fashion_mnist",
                           model="784-256-64-bits, ReLU, sigmoid code, BCE, Adam 1e-3",
                           ties="expected precision under uniformly random tie-breaking"),
           "results": results, "figures": [os.path.basename(p) for p in figures],
           "wall_seconds": round(time.time() - t0, 1)}
    probes.save_json(os.path.join(workdir, "results.json"), out)
    return out


def plot_neighbours(queries: np.ndarray, database: np.ndarray, neighbours: dict, path: str) -> str:
    """For each query row: the query, then its nearest database images under each method."""
    from aejax import figures  # noqa: F401
    import matplotlib.pyplot as plt

    methods = list(neighbours)
    k = next(iter(neighbours.values())).shape[1]
    nq = len(queries)
    fig, axes = plt.subplots(nq, len(methods) * (k + 1), figsize=(0.42 * len(methods) * (k + 1),
                                                                   0.45 * nq), squeeze=False)
    for r in range(nq):
        for m, name in enumerate(methods):
            base = m * (k + 1)
            images = [queries[r]] + [database[i] for i in neighbours[name][r]]
            for c, img in enumerate(images):
                ax = axes[r, base + c]
                ax.imshow(img.reshape(28, 28), cmap="gray" if c else "magma", vmin=0, vmax=1)
                ax.set_xticks([]), ax.set_yticks([])
                if r == 0 and c == 0:
                    ax.set_title(name, fontsize=6, loc="left")
    fig.suptitle("query (coloured), then its 8 nearest training images", fontsize=8)
    fig.subplots_adjust(wspace=0.03, hspace=0.03, left=0.01, right=0.99, bottom=0.01, top=0.9)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def record_entries(out: dict) -> list[tuple[str, int, float]]:
    """``(arm, seed, value)`` of experiments/results/retrieval.json (precision at 1) from
    :func:`run`'s output."""
    seed, r = out["setting"]["seed"], out["results"]
    return [("pixels, Euclidean", seed, r["pixels"]["1"])] + [
        (f"AE code > 0.5, Hamming, {b} bits", seed, r["codes"][str(b)]["binary_0.5"]["1"])
        for b in r["bits"]]


def main(argv=None) -> None:
    from experiments import results as records

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/repro_retrieval")
    parser.add_argument("--quick", action="store_true", help="a tiny setting (tests, smoke runs)")
    parser.add_argument("--epochs", type=int, default=5)
    # 3000 of the 10000 test images: all 10000 took 14 minutes here (precision at 0.01 either way).
    parser.add_argument("--num_queries", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        setting = dict(bits=(16,), epochs=1, num_queries=200, train_examples=2000)
    else:
        setting = dict(bits=(16, 32, 64), epochs=args.epochs, num_queries=args.num_queries)
    out = run(args.workdir, seed=args.seed, **setting)
    if records.default_run(parser, args):
        records.record_many("retrieval", record_entries(out), wall_seconds=out["wall_seconds"])
    print(f"wrote {os.path.join(args.workdir, 'results.json')} in {out['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
