"""Figures written by runs: reconstructions, learning curves, PCA beside the autoencoder (PNG)."""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # Runs are headless; never open a window.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _as_images(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    side = int(round(np.sqrt(x[0].size)))
    return x.reshape(len(x), side, side)


def image_rows(rows: Sequence[np.ndarray], labels: Sequence[str], path: str, *,
               title: str | None = None) -> str:
    """Rows of images (each (n, 784) or (n, 28, 28, 1)) with a label per row, saved to ``path``."""
    rows = [_as_images(r) for r in rows]
    n = len(rows[0])
    fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * n, 1.2 * len(rows)), squeeze=False)
    for r, (images, label) in enumerate(zip(rows, labels)):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(np.clip(images[c], 0, 1), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def learning_curves(history: Sequence[Mapping[str, float]], path: str, *,
                    key: str = "loss") -> str:
    """Train and validation ``key`` per epoch from ``history`` rows
    ``{epoch, train_KEY, validation_KEY}``."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    epochs = [h["epoch"] for h in history]
    for split in ("train", "validation"):
        name = f"{split}_{key}"
        values = [h.get(name, np.nan) for h in history]
        ax.plot(epochs, values, marker="o", ms=3, label=split)
    ax.set_xlabel("epoch")
    ax.set_ylabel(key)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_run_figures(workdir: str, originals: np.ndarray, reconstructions: np.ndarray,
                     history: Sequence[Mapping[str, float]], pca_reconstructions=None) -> list[str]:
    """The standard figures of a run; returns their paths."""
    paths = [image_rows([originals, reconstructions], ["original", "autoencoder"],
                        os.path.join(workdir, "reconstructions.png"),
                        title="test images (top) and their reconstructions (bottom)")]
    if history:
        paths.append(learning_curves(history, os.path.join(workdir, "learning_curves.png")))
    if pca_reconstructions is not None:
        paths.append(image_rows([originals, pca_reconstructions, reconstructions],
                                ["original", "PCA", "autoencoder"],
                                os.path.join(workdir, "pca_vs_autoencoder.png"),
                                title="PCA and the autoencoder at the same code size"))
    return paths
