"""Generation quality on Fashion-MNIST: a feature classifier trained once and cached, and scores.

Run:
    python -m experiments.quality --workdir=runs/family/vae [--num=10000]

scores the prior samples of the generative model trained in ``WORKDIR`` (a VAE-family run of
``experiments.main``: decoded means of ``z ~ N(0, I)``) against the Fashion-MNIST test set: the
Frechet distance and k-NN precision and recall (``aejax.quality``) on the features of
:func:`classifier`, and the floor, the first half of the test set scored against the second.
Writes ``WORKDIR/quality.json``.

The classifier is an MLP 784-512-128-10 (ReLU) trained with Adam for 5 epochs on the 55,000
training images (seed 0); its features are the 128 units before the output layer. It is trained
on the first call and cached in ``$AEJAX_CACHE_DIR`` (default ``~/.cache/aejax``) with its test
accuracy, so every score uses the same network. No download is involved.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from aejax import quality

CACHE_NAME = "fashion_mnist_classifier_784-512-128-10_v1"


class Classifier(nn.Module):
    """784-512-128-10, ReLU; ``features`` are the 128 units before the logits."""

    @nn.compact
    def __call__(self, x, *, features: bool = False):
        h = nn.relu(nn.Dense(512)(x.reshape(x.shape[0], -1)))
        h = nn.relu(nn.Dense(128)(h))
        return h if features else nn.Dense(10)(h)


def cache_dir() -> str:
    return os.path.expanduser(os.environ.get("AEJAX_CACHE_DIR") or "~/.cache/aejax")


def train_classifier(x: np.ndarray, y: np.ndarray, *, epochs: int = 5, batch_size: int = 128,
                     seed: int = 0) -> dict:
    """The classifier's parameters after ``epochs`` of Adam (1e-3) on ``x`` (N, 784), ``y`` (N,)."""
    model = Classifier()
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, x.shape[1])))["params"]
    tx = optax.adam(1e-3)

    @jax.jit
    def epoch(params, opt_state, perm):
        def step(carry, idx):
            params, opt_state = carry

            def loss(p):
                logits = model.apply({"params": p}, x_dev[idx])
                return optax.softmax_cross_entropy_with_integer_labels(logits, y_dev[idx]).mean()

            grads = jax.grad(loss)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        batches = perm[: len(perm) // batch_size * batch_size].reshape(-1, batch_size)
        (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), batches)
        return params, opt_state

    x_dev, y_dev = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)
    opt_state = tx.init(params)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        params, opt_state = epoch(params, opt_state, jnp.asarray(rng.permutation(len(x))))
    return jax.device_get(params)


@functools.partial(jax.jit, static_argnames="features")
def _apply(params, x, features: bool):
    return Classifier().apply({"params": params}, x, features=features)


def apply_batched(params, x: np.ndarray, *, features: bool, batch_size: int = 2000) -> np.ndarray:
    """The classifier's features (or logits) of ``x``, ``batch_size`` images per call."""
    x = np.asarray(x, np.float32).reshape(len(x), -1)
    return np.concatenate([np.asarray(_apply(params, x[i:i + batch_size], features))
                           for i in range(0, len(x), batch_size)])


def classifier(splits=None, *, directory: Optional[str] = None) -> tuple[dict, dict]:
    """``(params, info)`` of the cached classifier, trained first when there is none.

    ``info`` holds its test accuracy. ``splits``: Fashion-MNIST (flat); loaded when needed.
    """
    directory = directory or cache_dir()
    path = os.path.join(directory, CACHE_NAME)
    if os.path.exists(path + ".msgpack") and os.path.exists(path + ".json"):
        with open(path + ".json") as f:
            info = json.load(f)
        template = Classifier().init(jax.random.PRNGKey(0), jnp.zeros((1, 784)))["params"]
        with open(path + ".msgpack", "rb") as f:
            return serialization.from_bytes(template, f.read()), info
    if splits is None:
        from experiments import probes

        splits = probes.fashion(flat=True)
    (x, y), (x_test, y_test) = splits.train, splits.test
    params = train_classifier(np.asarray(x).reshape(len(x), -1), np.asarray(y))
    logits = apply_batched(params, x_test, features=False)
    info = {"model": "MLP 784-512-128-10 relu, Adam 1e-3, 5 epochs, batch 128, seed 0",
            "features": 128, "test_accuracy": float(np.mean(logits.argmax(1) == y_test))}
    os.makedirs(directory, exist_ok=True)
    for suffix, data in ((".msgpack", serialization.to_bytes(params)),
                         (".json", json.dumps(info, indent=2).encode())):
        with open(path + suffix + ".tmp", "wb") as f:
            f.write(data)
        os.replace(path + suffix + ".tmp", path + suffix)
    return params, info


def score(params, real: np.ndarray, generated: np.ndarray) -> dict:
    """Frechet distance and precision / recall (k = 3) of ``generated`` against ``real``."""
    fr, fg = (apply_batched(params, a, features=True) for a in (real, generated))
    pr = quality.precision_recall(fr, fg, k=3)
    return {"frechet_distance": quality.frechet_distance(fr, fg), "precision": pr.precision,
            "recall": pr.recall}


def floor(params, x_test: np.ndarray) -> dict:
    """The scores of real images: the test set's first half against its second."""
    half = len(x_test) // 2
    return score(params, x_test[half:2 * half], x_test[:half])


def prior_sampler(workdir: str) -> Callable[[jax.Array, int], np.ndarray]:
    """``sample(rng, num)``: decoded means of ``z ~ N(0, I)`` of the model trained in ``workdir``
    (a conditional model's of the classes ``0, 1, ...`` in turn)."""
    from aejax import models, vae
    from aejax.runtime import trainer

    with open(os.path.join(workdir, "summary.json")) as f:
        model_config = json.load(f)["model"]
    model = models.from_config(model_config)
    params = trainer.load_best_params(workdir)
    return lambda rng, num: np.asarray(vae.sample_prior(
        model, params, rng, num, condition=trainer.class_labels(model, num)))


def code_marginal_sampler(codes: np.ndarray, num_latents: int, decode):
    """``sample(rng, num)`` for a vector-quantized model: each of the ``num_latents`` positions
    takes the codeword of a uniformly drawn training example at that position, independently of
    the other positions (the product of the codes' per-position empirical marginals, the
    simplest prior over a codebook), and ``decode`` maps the codes ``(num, num_latents *
    code_dim)`` to images."""
    n = len(codes)
    per_position = codes.reshape(n, num_latents, -1)

    def sample(rng, num):
        rows = np.asarray(jax.random.randint(rng, (num, num_latents), 0, n))
        z = per_position[rows, np.arange(num_latents)[None, :]]  # (num, L, D)
        return np.asarray(decode(jnp.asarray(z.reshape(num, -1))))

    return sample


def generator(config, workdir: str, splits, *, components: int = 10, seed: int = 0):
    """``(sample, description)`` for the generative model trained in ``workdir`` by ``config``,
    where ``sample(rng, num)`` gives decoded means; ``(None, why)`` for a model without a prior.

    A stochastic encoder (the VAE family): ``z ~ N(0, I)``; a conditional one decodes them with
    the classes ``0, 1, ...`` in turn (as many of each as the test set holds, 1,000 in
    Fashion-MNIST's). A deterministic one trained to match
    ``N(0, I)`` (the ``mmd`` term, WAE): the same. Any other deterministic encoder (RAE): the
    ex-post density of Ghosh et al., a Gaussian mixture of ``components`` full-covariance
    components fitted to the training codes. A vector-quantized code (VQ-VAE):
    :func:`code_marginal_sampler` on the training codes.
    """
    from aejax import models, vae
    from aejax.runtime import trainer

    model = models.from_config(config.model)
    params = trainer.load_best_params(workdir)
    if callable(getattr(model, "posterior", None)):
        sample = lambda rng, num: np.asarray(vae.sample_prior(
            model, params, rng, num, condition=trainer.class_labels(model, num)))
        return sample, "decoded means of z ~ N(0, I)" + (
            ", every class in turn" if models.conditional(model) else "")
    decode = jax.jit(lambda z: jax.nn.sigmoid(models.decoder(model, params)(z)))
    if callable(getattr(model, "quantized", None)):
        codes = np.asarray(models.encode_batched(model, params, splits.train[0]))
        sample = code_marginal_sampler(codes, int(getattr(model, "num_latents")), decode)
        return sample, ("codewords drawn per position from the training codes' marginals "
                        "(independent positions), decoded")
    size = int(getattr(model, "code_size"))
    if "mmd" in config.loss.terms:
        return (lambda rng, num: np.asarray(decode(jax.random.normal(rng, (num, size)))),
                "decoded z ~ N(0, I), the prior the MMD term matches")
    from sklearn.mixture import GaussianMixture

    codes = np.asarray(models.encode_batched(model, params, splits.train[0]), np.float64)
    gmm = GaussianMixture(components, covariance_type="full", random_state=seed,
                          reg_covar=1e-5).fit(codes)

    def sample(rng, num):
        z, _ = gmm.sample(num)
        order = np.asarray(jax.random.permutation(rng, num))  # sample() groups by component
        return np.asarray(decode(jnp.asarray(z[order], jnp.float32)))

    return sample, f"ex-post GMM ({components} components) on the training codes, decoded"


def generation_scores(config, workdir: str, splits, *, num: int = 10000) -> dict:
    """Scores of ``num`` generated images against the first ``num`` test images, with the floor;
    ``{"sampler": why}`` alone for a model without a prior."""
    sample, description = generator(config, workdir, splits)
    if sample is None:
        return {"sampler": description}
    params, info = classifier(splits)
    x_test = np.asarray(splits.test[0])[:num]
    return {"sampler": description, "classifier_test_accuracy": info["test_accuracy"],
            "images": len(x_test),
            **score(params, x_test, sample(jax.random.PRNGKey(0), len(x_test))),
            "floor": floor(params, x_test)}


def main(argv=None) -> dict:
    from experiments import probes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a run of a VAE-family config")
    parser.add_argument("--num", type=int, default=10000, help="generated images (and real ones)")
    args = parser.parse_args(argv)
    splits = probes.fashion(flat=True)
    params, info = classifier(splits)
    x_test = np.asarray(splits.test[0])[: args.num]
    generated = prior_sampler(args.workdir)(jax.random.PRNGKey(0), len(x_test))
    result = {"classifier": info, "images": len(x_test), **score(params, x_test, generated),
              "floor": floor(params, x_test)}
    probes.save_json(os.path.join(args.workdir, "quality.json"), result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
