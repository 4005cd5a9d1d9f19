"""Figures written by runs: reconstructions, learning curves, PCA beside the autoencoder (PNG)."""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
# Figures are built as matplotlib Figure objects and written to files, never through pyplot:
# no window opens, and the backend a user's notebook or script chose is left alone.
from matplotlib.figure import Figure


def _as_images(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    side = int(round(np.sqrt(x[0].size)))
    return x.reshape(len(x), side, side)


def strip(images: np.ndarray, gap: int = 2) -> np.ndarray:
    """Square images ``(n, side, side)`` side by side, clipped to [0, 1], ``gap`` columns of
    ones (white) between two: ``(side, n * side + (n - 1) * gap)``."""
    n, side = images.shape[0], images.shape[1]
    out = np.ones((side, n * side + (n - 1) * gap), np.float32)
    for c, image in enumerate(images):
        out[:, c * (side + gap):c * (side + gap) + side] = np.clip(image, 0, 1)
    return out


def image_rows(rows: Sequence[np.ndarray], labels: Sequence[str], path: str, *,
               title: str | None = None, gap: int = 2) -> str:
    """Rows of images (each (n, 784) or (n, 28, 28, 1)) with a label per row, saved to ``path``.

    Each row is one strip (its first ``n = len(rows[0])`` images side by side, ``gap`` white
    pixels apart) drawn on one axes: a figure of a few axes, not one per image, which
    matplotlib draws many times faster.
    """
    rows = [_as_images(r) for r in rows]
    n = len(rows[0])
    fig = Figure(figsize=(1.1 * n, 1.2 * len(rows)))
    axes = fig.subplots(len(rows), 1, squeeze=False)
    for ax, images, label in zip(axes[:, 0], rows, labels):
        ax.imshow(strip(images[:n], gap), cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_ylabel(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return path


def learning_curves(history: Sequence[Mapping[str, float]], path: str, *,
                    key: str = "loss") -> str:
    """Train and validation ``key`` per epoch from ``history`` rows
    ``{epoch, train_KEY, validation_KEY}``."""
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
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
