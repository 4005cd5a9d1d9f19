# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # aejax in ten cells: a denoising, contractive, sparse autoencoder on Fashion-MNIST
#
# This notebook is a plain Python file in jupytext's percent format: open it in Jupyter with
# jupytext installed (`pip install jupytext`, then *Open as notebook*), or run it as a script
# from the repository root: `python docs/tutorial.py`. It trains for about a minute on two CPU
# cores. `AEJAX_TUTORIAL_QUICK=1` runs it on a small subset in seconds (the test suite does).
#
# What it shows:
# 1. an objective composed from plain terms: reconstruction of the clean image from a noisy
#    one (denoising), the exact contractive penalty, and a KL sparsity penalty;
# 2. training with `aejax.runtime.fit`, the in-memory loop on the fused step;
# 3. reconstructions and a scatter of the codes;
# 4. the exact contractive penalty beside its stochastic estimate.

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib

if "ipykernel" not in os.environ.get("MPLBACKEND", "") and not os.environ.get("DISPLAY"):
    matplotlib.use("Agg")  # headless: figures are written to files
import matplotlib.pyplot as plt
import numpy as np
import optax

from aejax import corruptions, figures, losses, models, objectives, pca, step
from aejax.data import splits
from aejax.runtime import fit

QUICK = os.environ.get("AEJAX_TUTORIAL_QUICK") == "1"
OUT = os.environ.get("AEJAX_TUTORIAL_OUT", "runs/tutorial")
os.makedirs(OUT, exist_ok=True)

# %% [markdown]
# ## Data
# Fashion-MNIST through tensorflow-datasets (prepared offline from local files when the
# machine has no network; see the README). `flat=True` gives `(N, 784)` floats in [0, 1].

# %%
data = splits.load("fashion_mnist", flat=True, validation_size=5000)
x_train, y_train = data.train
x_test, y_test = data.test
if QUICK:
    x_train, y_train, x_test, y_test = x_train[:2048], y_train[:2048], x_test[:256], y_test[:256]
print("train", x_train.shape, "test", x_test.shape)

# %% [markdown]
# ## Model and objective
# A 784-256-32 encoder with a sigmoid code (the KL sparsity needs mean activations in (0, 1)).
# Each term is a function of one forward pass that returns a value per example; `combine`
# weighs them and reports each one. The corruption is applied to the model's input, and the
# reconstruction is scored against the clean image: a denoising autoencoder.

# %%
model = models.MLPAutoencoder(hidden=(256,), code_size=32, code_activation="sigmoid")
objective = objectives.combine({
    "reconstruction": (1.0, objectives.reconstruction("bce")),
    "contractive": (0.1, objectives.contractive(mode="best")),  # exact ||J||_F^2, fastest way
    "kl_sparsity": (0.5, objectives.kl_sparsity("code", rho=0.1)),
})
per_example = step.make_per_example_fn(model, objective, corrupt=corruptions.gaussian(0.3))
params = models.init(model, jax.random.PRNGKey(0), jnp.asarray(x_train[:2]))

# %% [markdown]
# ## Training
# `fit` runs each epoch as one compiled loop over device-resident data and returns the
# parameters and each epoch's mean loss; `fit.evaluate` gives the mean of every metric.

# %%
before = fit.evaluate(per_example, params, x_test)
params, history = fit.fit(per_example, params, optax.adam(1e-3), x_train,
                          epochs=2 if QUICK else 4, batch_size=128)
print("mean loss per epoch", [round(v, 2) for v in history])
test = fit.evaluate(per_example, params, x_test)
print("test, untrained", {k: round(v, 3) for k, v in before.items()})
print("test, trained  ", {k: round(v, 3) for k, v in test.items()})

# %% [markdown]
# ## Reconstructions
# Top: test images; middle: the noisy inputs; bottom: the reconstructions (sigmoid of the
# decoder's logits, from the noisy inputs).

# %%
x = jnp.asarray(x_test[:10])
noisy = corruptions.gaussian(0.3)(jax.random.PRNGKey(1), x)
recon = jax.nn.sigmoid(models.reconstruct_logits(model, params, noisy))
figures.image_rows([np.asarray(x), np.asarray(noisy), np.asarray(recon)],
                   ["test", "noisy", "reconstructed"], os.path.join(OUT, "reconstructions.png"))

# %% [markdown]
# ## The codes
# The 32-dimensional codes of the test set, projected on their two leading principal
# components and coloured by class.

# %%
codes = models.encode_batched(model, params, x_test)
plane = pca.encode(pca.fit(codes, 2), codes)
fig, ax = plt.subplots(figsize=(5, 5))
points = ax.scatter(*np.asarray(plane).T, c=y_test, cmap="tab10", s=3)
ax.legend(*points.legend_elements(), title="class", fontsize=6, loc="best")
fig.savefig(os.path.join(OUT, "codes.png"), dpi=80)

# %% [markdown]
# ## Exact against estimated contractive penalty
# `losses.contractive` computes ||J||_F^2 of any encoder exactly (`mode="rev"`: one
# vector-Jacobian product per code unit). `aejax.jacobians` estimates it from a budget of
# Jacobian-vector products, unbiased: Hutchinson with Gaussian or Rademacher probes, and
# Hutch++, which spends a third of the budget on the leading directions and is far more
# accurate when the spectrum decays. `contractive_audit` puts numbers on what an estimator
# changes in training: its error and the cosine between the exact and estimated gradients.

# %%
from aejax import jacobians

encode = models.encoder(model, params)
x = jnp.asarray(x_test[:256])
exact = losses.contractive(encode, x, mode="rev")
print(f"exact mean ||J||_F^2 = {float(exact.mean()):.4f}")
for estimator in jacobians.ESTIMATORS:
    for probes in (3, 12):
        # Jitted: one compiled program per estimator and budget, not one per operation.
        estimate = jax.jit(lambda x, key: jacobians.contractive_estimate(
            encode, x, key, estimator=estimator, num_probes=probes))(x, jax.random.PRNGKey(probes))
        error = float(jnp.mean(jnp.abs(estimate - exact) / exact))
        print(f"{estimator:>10}, {probes:2d} products: mean relative error per example {error:.3f}")


def encode_with_params(p, v):
    return models.encoder(model, p)(v)


audit = jax.jit(lambda params, x, key: jacobians.contractive_audit(
    encode_with_params, params, x, key, estimator="hutch++", num_probes=6))(
        params, x, jax.random.PRNGKey(0))
print({k: round(float(v), 4) for k, v in audit.items()})
