"""The lecture notes' exercise on Fashion-MNIST: first-layer weights of the multilayer autoencoder
(784-128-32-128-784) as 28x28 images, the convolutional autoencoder's first-layer 3x3 filters,
and the same test images' reconstructions after every epoch, one strip per epoch.

Run:
    python -m experiments.repro_filters --workdir=runs/repro_filters [--quick]

Every epoch's parameters come from the run's own end-of-epoch checkpoints (kept, all of them),
so the strips show one uninterrupted run. Writes results.json and PNGs in the workdir; the table
is in experiments/results/filters.md.
"""

from __future__ import annotations

import argparse
import importlib
import os
import time

import jax
import numpy as np

from aejax import models, objectives
from aejax.runtime import checkpoints
from aejax.runtime.trainer import reconstruct_images
from aejax.data import batching
from experiments import probes


def tile_images(tiles: np.ndarray, *, cols: int, pad: int = 1, normalize: bool = True,
                fill: float = 1.0) -> np.ndarray:
    """Tiles ``(N, h, w)`` laid out row by row on a grid with ``cols`` columns.

    Tile ``i`` lands at grid cell ``(i // cols, i % cols)``, its top-left pixel at
    ``(pad + row * (h + pad), pad + col * (w + pad))``; borders and empty cells hold ``fill``.
    With ``normalize`` each tile is mapped to [0, 1] by its own largest absolute value, zero at
    0.5 (weights have a sign, and their scales differ from unit to unit).

    Returns:
      ``(rows * (h + pad) + pad, cols * (w + pad) + pad)`` with ``rows = ceil(N / cols)``.
    """
    tiles = np.asarray(tiles, np.float64)
    if tiles.ndim != 3 or cols < 1 or pad < 0:
        raise ValueError(f"tile_images: tiles must be (N, h, w) and cols >= 1, pad >= 0; got shape "
                         f"{tiles.shape}, cols={cols}, pad={pad}.")
    n, h, w = tiles.shape
    if normalize:
        scale = np.abs(tiles).reshape(n, -1).max(axis=1)[:, None, None]
        tiles = 0.5 + 0.5 * tiles / np.where(scale > 0, scale, 1.0)
    rows = -(-n // cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), fill)
    for i in range(n):
        r, c = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[top:top + h, left:left + w] = tiles[i]
    return grid


def first_layer_filters(model, params) -> np.ndarray:
    """First-layer filters ``(units, h, w)``: a dense 784-K kernel as K 28x28 images, or a conv
    kernel ``(kh, kw, 1, K)`` as K kh x kw images (:func:`aejax.models.first_layer_kernel`)."""
    kernel = np.asarray(models.first_layer_kernel(model, params))
    if kernel.ndim == 2:
        side = int(round(np.sqrt(kernel.shape[0])))
        return kernel.T.reshape(-1, side, side)
    if kernel.ndim == 4 and kernel.shape[2] == 1:
        return np.transpose(kernel[:, :, 0, :], (2, 0, 1))
    raise ValueError(f"first_layer_filters: expected a (784, K) or (kh, kw, 1, K) kernel, got "
                     f"{kernel.shape}.")


def cosine_to_init(initial: np.ndarray, final: np.ndarray) -> np.ndarray:
    """Per-unit cosine similarity ``(K,)`` between initial and final filters ``(K, ...)``:
    near 1 for a unit whose weights still look like their random draw."""
    a = np.asarray(initial, np.float64).reshape(len(initial), -1)
    b = np.asarray(final, np.float64).reshape(len(final), -1)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def per_epoch_params(workdir: str) -> list[tuple[int, dict]]:
    """``[(step, params)]`` of every checkpoint kept in ``workdir`` (oldest first)."""
    ckpts = checkpoints.Checkpoints(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        return [(s, ckpts.read(s)[0]["state"]["params"]) for s in ckpts.steps()]
    finally:
        ckpts.close()


def initial_params(config, model, x_train: np.ndarray) -> dict:
    """The run's initial parameters, drawn as ``aejax.runtime.trainer.train_and_evaluate`` draws them."""
    init_rng = jax.random.split(jax.random.PRNGKey(config.seed), 4)[0]
    return models.init(model, init_rng, jax.numpy.asarray(x_train[:config.batch_size]))


def squared_error_per_image(model, params, x: np.ndarray, batch: int = 1000) -> float:
    """Mean over ``x`` of the summed squared error of its sigmoid reconstruction."""
    total = 0.0
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        rec = reconstruct_images(model, params, jax.numpy.asarray(xb), objectives.reconstruction("bce"))
        total += float(np.square(rec - xb).reshape(len(xb), -1).sum())
    return total / len(x)


def filters_config(name: str, *, epochs: int, seed: int = 0, train_examples: int = 0):
    """The project's ``multilayer`` or ``conv`` config, keeping every end-of-epoch checkpoint."""
    c = importlib.import_module(f"experiments.configs.{name}").get_config()
    c.seed = seed
    c.num_epochs = epochs
    c.data.train_examples = train_examples
    c.progress = False
    c.figures = False
    c.pca_baseline = False
    c.keep_checkpoints = epochs
    c.checkpoint_every_steps = 10**9  # only the end-of-epoch checkpoints
    return c


def save_grid(grid: np.ndarray, path: str, *, title: str, scale: float) -> str:
    from aejax import figures  # noqa: F401  (headless backend)
    import matplotlib.pyplot as plt

    h, w = grid.shape
    fig, ax = plt.subplots(figsize=(scale * w / 80, scale * h / 80 + 0.3))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize=8)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def run_model(name: str, workdir: str, figdir: str, *, epochs: int, num_images: int,
              seed: int = 0, train_examples: int = 0) -> dict:
    """Trains ``name`` in ``workdir``; renders its filters and per-epoch strips into ``figdir``."""
    from aejax import figures

    flat = name != "conv"
    splits = probes.fashion(flat=flat)
    x_train, x_test = splits.train[0], splits.test[0]
    config = filters_config(name, epochs=epochs, seed=seed, train_examples=train_examples)
    model, _, summary = probes.train_model(config, workdir, splits)
    snapshots = [(0, initial_params(config, model, x_train))] + per_epoch_params(workdir)
    steps_per_epoch = batching.steps_per_epoch(len(x_train[:train_examples or None]), config.batch_size)
    shown = x_test[:num_images]
    rows, labels, errors = [shown], ["original"], []
    for step, params in snapshots:
        epoch = step // steps_per_epoch
        rows.append(reconstruct_images(model, params, jax.numpy.asarray(shown),
                                       objectives.reconstruction("bce")))
        labels.append("init" if epoch == 0 else f"epoch {epoch}")
        errors.append({"epoch": epoch, "test_squared_error_per_image":
                       squared_error_per_image(model, params, x_test)})
    strip = figures.image_rows(rows, labels, os.path.join(figdir, f"{name}_epochs.png"),
                               title=f"{name}: the same test images reconstructed after each epoch")
    final = snapshots[-1][1]
    filt = first_layer_filters(model, final)
    cosine = cosine_to_init(first_layer_filters(model, snapshots[0][1]), filt)
    cols = 16 if len(filt) > 16 else 8
    grid = tile_images(filt, cols=cols)
    what = ("first-layer weights, one 28x28 tile per hidden unit" if flat
            else "first conv layer: 3x3 filters")
    filters_png = save_grid(grid, os.path.join(figdir, f"{name}_filters.png"),
                            title=f"{name}: {what} (grey = 0)", scale=2 if flat else 12)
    return {"config": name, "model": config.model.to_dict(), "epochs": epochs,
            "per_epoch": errors, "test_squared_error_per_image": summary["test"][
                "squared_error_per_image"],
            "filters_shape": list(filt.shape),
            "filter_cosine_to_init_median": float(np.median(cosine)),
            "filters_still_like_init_fraction": float(np.mean(cosine > 0.9)),
            # From the run's metadata: the training time survives a resumed or re-evaluated run.
            "train_seconds": summary["train_seconds"],
            "figures": [os.path.basename(strip), os.path.basename(filters_png)]}


def run(workdir: str, *, mlp_epochs: int, conv_epochs: int, num_images: int = 10,
        train_examples: int = 0, seed: int = 0) -> dict:
    t0 = time.time()
    out = {key: run_model(name, os.path.join(workdir, name), workdir, epochs=epochs,
                          num_images=num_images, seed=seed, train_examples=train_examples)
           for key, name, epochs in (("mlp", "multilayer", mlp_epochs),
                                     ("conv", "conv", conv_epochs))}
    figures = [f for r in out.values() for f in r["figures"]]
    out = {"setting": dict(mlp_epochs=mlp_epochs, conv_epochs=conv_epochs, num_images=num_images,
                           train_examples=train_examples or 55000, seed=seed,
                           dataset="fashion_mnist"),
           "results": out, "figures": figures, "wall_seconds": round(time.time() - t0, 1)}
    probes.save_json(os.path.join(workdir, "results.json"), out)
    return out


def record_entries(out: dict) -> list[tuple[str, int, float]]:
    """``(arm, seed, value)`` of experiments/results/filters.json from :func:`run`'s output."""
    seed, r = out["setting"]["seed"], out["results"]
    return [("multilayer 784-128-32-128-784, 10 epochs", seed,
             r["mlp"]["test_squared_error_per_image"]),
            ("conv, 5 epochs", seed, r["conv"]["test_squared_error_per_image"])]


def main(argv=None) -> None:
    from experiments import results as records

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/repro_filters")
    parser.add_argument("--quick", action="store_true", help="a tiny setting (tests, smoke runs)")
    parser.add_argument("--mlp_epochs", type=int, default=10)
    parser.add_argument("--conv_epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        setting = dict(mlp_epochs=2, conv_epochs=2, num_images=6, train_examples=1000)
    else:
        setting = dict(mlp_epochs=args.mlp_epochs, conv_epochs=args.conv_epochs)
    out = run(args.workdir, seed=args.seed, **setting)
    if records.default_run(parser, args):
        records.record_many("filters", record_entries(out), wall_seconds=out["wall_seconds"])
    print(f"wrote {os.path.join(args.workdir, 'results.json')} in {out['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
