"""Objectives: weighted sums of named terms over one forward pass, every part reported.

A *term* maps a :class:`Forward` (everything a loss may look at: target, input, logits, code,
sown activations, the encoder as a function) to per-example values ``(B,)``. :func:`combine`
adds weighted terms into ``objective(forward) -> (total, parts)``, so a new penalty plugs in
without touching the train step.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from aejax import losses, models

Array = jax.Array
Term = Callable[["Forward"], Array]
Weight = Union[float, Callable[[Array], Array]]
Objective = Callable[["Forward"], tuple[Array, dict[str, Array]]]


class Forward(NamedTuple):
    """One forward pass, as the terms see it.

    Attributes:
      x: clean targets ``(B, ...)``.
      x_in: model inputs ``(B, ...)`` (``x`` corrupted, for denoising).
      logits: decoder outputs shaped like ``x``.
      code: codes ``(B, H)`` (the sampled ``z`` for a VAE).
      activations: sown activations by layer name (``"code"``, ``"hidden_0"``, ...).
      mask: ``(B,)`` 1 for real examples, 0 for padding.
      step: the global step (for scheduled weights).
      rng: key for terms that draw randomness (e.g. the contractive estimator).
      model: the flax module.
      params: its parameters.
      extras: model-specific outputs (VAE: ``mean``, ``logvar``, ``log_scale``).
    """

    x: Array
    x_in: Array
    logits: Array
    code: Array
    activations: Mapping[str, Array]
    mask: Array
    step: Array
    rng: Array
    model: nn.Module
    params: Any
    extras: Mapping[str, Array]

    def encode(self, x: Array) -> Array:
        """The encoder (code or VAE mean) as a function of inputs, at the current parameters."""
        out = self.model.apply({"params": self.params}, x, method=self.model.encode)
        return out[0] if isinstance(self.model, models.VAE) else out


def forward(model: nn.Module, params: Any, x: Array, x_in: Array, *, rng: Array,
            step: Array, mask: Optional[Array] = None) -> Forward:
    """Runs ``model`` on ``x_in`` and collects what the terms need."""
    r_model, r_terms = jax.random.split(rng)
    mask = jnp.ones(x.shape[:1], x.dtype) if mask is None else mask
    variables = {"params": params}
    if isinstance(model, models.VAE):
        (logits, z, mean, logvar), state = model.apply(variables, x_in, r_model,
                                                       mutable=["intermediates"])
        extras = {"mean": mean, "logvar": logvar,
                  "log_scale": model.apply(variables, method=model.decoder_log_scale)}
        code = z
    else:
        (logits, code), state = model.apply(variables, x_in, mutable=["intermediates"])
        extras = {}
    activations = {k: v[0] for k, v in state.get("intermediates", {}).items()}
    activations.setdefault("code", code)
    return Forward(x=x, x_in=x_in, logits=logits, code=code, activations=activations, mask=mask,
                   step=step, rng=r_terms, model=model, params=params, extras=extras)


def masked_mean(values: Array, mask: Array) -> Array:
    """Mean of per-example ``values`` over examples where ``mask`` is 1 (padding excluded)."""
    return (values * mask).sum() / jnp.maximum(mask.sum(), 1.0)


# --------------------------------------------------------------------------- reconstruction

RECONSTRUCTIONS = ("bce", "mse", "mse_linear", "gaussian")


def reconstruct(logits: Array, kind: str) -> Array:
    """Reconstructed images from decoder outputs: sigmoid for Bernoulli/sigmoid-MSE, as is otherwise."""
    return logits if kind in ("mse_linear", "gaussian") else jax.nn.sigmoid(logits)


def reconstruction(kind: str = "bce") -> Term:
    """Reconstruction term scored against the clean target.

    ``"bce"``: Bernoulli negative log-likelihood of the logits (nats per example);
    ``"mse"``: mean squared error of ``sigmoid(logits)``; ``"mse_linear"``: of the raw outputs
    (linear decoders, the PCA comparison); ``"gaussian"``: Gaussian negative log-likelihood with
    the model's learned ``log_scale`` (VAE).
    """
    if kind not in RECONSTRUCTIONS:
        raise ValueError(f"Unknown reconstruction {kind!r}; choose one of {RECONSTRUCTIONS}.")

    def term(f: Forward) -> Array:
        if kind == "bce":
            return losses.bce_with_logits(f.logits, f.x)
        if kind == "gaussian":
            return losses.gaussian_nll(f.logits, f.x, log_scale=f.extras.get("log_scale", 0.0))
        return losses.mse(reconstruct(f.logits, kind), f.x)

    return term


def _layer(f: Forward, layer: str) -> Array:
    if layer not in f.activations:
        raise ValueError(f"No activations named {layer!r} in {type(f.model).__name__}; available: "
                         f"{sorted(f.activations)}.")
    return f.activations[layer]


def l1_activity(layer: str = "code") -> Term:
    """L1 activity penalty ``sum_i |a_i|`` on the activations of ``layer``."""
    return lambda f: losses.l1_activity(_layer(f, layer))


def kl_sparsity(layer: str = "code", *, rho: float = 0.05) -> Term:
    """KL sparsity ``sum_j KL(rho || rho_hat_j)`` on ``layer`` (a batch value, given to each example)."""
    if not 0.0 < rho < 1.0:
        raise ValueError(f"kl_sparsity: rho must lie in (0, 1), got {rho}.")

    def term(f: Forward) -> Array:
        a = _layer(f, layer)
        value = losses.kl_sparsity(a, rho=rho, mask=f.mask)
        return jnp.broadcast_to(value, a.shape[:1])

    return term


CONTRACTIVE_TERM_MODES = ("best", "one_hidden", "dense", "sigmoid") + losses.CONTRACTIVE_MODES


def contractive(*, mode: str = "best", chunk_size: Optional[int] = None,
                num_probes: int = 1) -> Term:
    """Contractive penalty: squared Frobenius norm of the encoder Jacobian at the model input.

    Args:
      mode: one of :data:`aejax.losses.CONTRACTIVE_MODES` (generic, any encoder), ``"dense"``
        (exact, through the Gram matrix of a dense first layer, MLP encoders), ``"one_hidden"``
        (exact, one hidden layer and a linear code: a quadratic form per example), ``"sigmoid"``
        (closed form, one-layer sigmoid MLP encoders) or ``"best"``: the fastest exact way the
        model allows.
      chunk_size: examples at a time, to bound memory.
      num_probes: probes per example for ``"estimate"``.
    """
    if mode not in CONTRACTIVE_TERM_MODES:
        raise ValueError(f"Unknown contractive mode {mode!r}; choose one of {CONTRACTIVE_TERM_MODES}.")

    def term(f: Forward) -> Array:
        model = f.model
        is_mlp = isinstance(model, models.MLPAutoencoder)
        m = mode
        if m == "best":
            one_sigmoid = is_mlp and not model.hidden and model.code_activation == "sigmoid"
            one_hidden = is_mlp and len(model.hidden) == 1 and model.code_activation == "linear"
            m = ("sigmoid" if one_sigmoid else "one_hidden" if one_hidden
                 else "dense" if is_mlp else "auto")
        if m in ("dense", "sigmoid", "one_hidden") and not is_mlp:
            raise ValueError(f"contractive mode {m!r} needs an MLPAutoencoder, got "
                             f"{type(model).__name__}; use mode='auto'.")
        variables = {"params": f.params}
        if m == "sigmoid":
            if model.hidden or model.code_activation != "sigmoid":
                raise ValueError("contractive mode 'sigmoid' is the closed form of a one-layer "
                                 "sigmoid encoder (hidden=(), code_activation='sigmoid').")
            return losses.contractive_sigmoid(f.code, f.params["encoder_0"]["kernel"])
        if m == "one_hidden":
            if len(model.hidden) != 1 or model.code_activation != "linear":
                raise ValueError("contractive mode 'one_hidden' needs an MLP encoder with one hidden "
                                 "layer and a linear code; use mode='dense'.")
            pre = model.apply(variables, f.x_in, method=model.encode_first)
            return losses.contractive_one_hidden(models.activation(model.activation), pre,
                                                 f.params["encoder_0"]["kernel"],
                                                 f.params["encoder_1"]["kernel"])
        if m == "dense":
            pre = model.apply(variables, f.x_in, method=model.encode_first)
            head = lambda p: model.apply(variables, p, method=model.encode_head)
            return losses.contractive_dense_input(head, f.params["encoder_0"]["kernel"], pre,
                                                  chunk_size=chunk_size)
        return losses.contractive(f.encode, f.x_in, mode=m, chunk_size=chunk_size,
                                  num_probes=num_probes, rng=f.rng)

    return term


def gaussian_kl() -> Term:
    """VAE term ``KL(q(z|x) || N(0, I))`` in nats per example."""

    def term(f: Forward) -> Array:
        if "mean" not in f.extras:
            raise ValueError(f"The 'kl' term needs a VAE; {type(f.model).__name__} has no "
                             "posterior (use model.name='vae').")
        return losses.gaussian_kl(f.extras["mean"], f.extras["logvar"])

    return term


# --------------------------------------------------------------------------- combination


def linear_warmup(weight: float, steps: int) -> Callable[[Array], Array]:
    """A weight that rises linearly from 0 to ``weight`` over ``steps`` steps (KL warm-up)."""
    if steps <= 0:
        return lambda step: jnp.asarray(weight, jnp.float32)
    return lambda step: weight * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / steps)


def combine(terms: Mapping[str, tuple[Weight, Term]]) -> Objective:
    """Weighted sum of named terms.

    Args:
      terms: ``{name: (weight, term)}``; a weight is a non-negative float or a function of the
        step (a schedule).

    Returns:
      ``objective(forward) -> (total (B,), parts)`` where ``parts[name]`` is the unweighted
      ``(B,)`` value of each term.

    >>> obj = combine({"rec": (1.0, reconstruction("mse"))})
    """
    if not terms:
        raise ValueError("combine: an objective needs at least one term.")
    for name, (w, _) in terms.items():
        if not callable(w) and (not math.isfinite(float(w)) or float(w) < 0):
            raise ValueError(f"Term {name!r} has weight {w}; weights must be finite and >= 0.")

    def objective(f: Forward) -> tuple[Array, dict[str, Array]]:
        parts = {name: term(f) for name, (_, term) in terms.items()}
        total = 0.0
        for name, (w, _) in terms.items():
            weight = w(f.step) if callable(w) else w
            total = total + weight * parts[name]
        return total, parts

    return objective


TERMS: dict[str, Callable[..., Term]] = {
    "l1": l1_activity,
    "kl_sparsity": kl_sparsity,
    "contractive": contractive,
    "kl": gaussian_kl,
}


def build(reconstruction_kind: str, terms: Mapping[str, Mapping[str, Any]]) -> Objective:
    """Objective from configuration: a reconstruction term plus ``{kind: {weight, options...}}``.

    A term's options are its factory's keyword arguments; ``warmup_steps`` makes the weight rise
    linearly from 0. Example: ``build("bce", {"contractive": {"weight": 0.1}})``.
    """
    spec: dict[str, tuple[Weight, Term]] = {"reconstruction": (1.0, reconstruction(reconstruction_kind))}
    for kind, options in terms.items():
        if kind not in TERMS:
            raise ValueError(f"Unknown loss term {kind!r}; choose from {sorted(TERMS)}.")
        options = dict(options)
        weight = float(options.pop("weight", 1.0))
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"Loss term {kind!r} has weight {weight}; weights must be finite and >= 0.")
        warmup = int(options.pop("warmup_steps", 0))
        try:
            term = TERMS[kind](**options)
        except TypeError as e:
            raise ValueError(f"Loss term {kind!r} got unknown options {sorted(options)}: {e}") from None
        spec[kind] = (linear_warmup(weight, warmup) if warmup else weight, term)
    return combine(spec)


def check_compatible(model: nn.Module, terms: Mapping[str, Mapping[str, Any]]) -> None:
    """Errors that can be found before tracing: a KL sparsity on non-sigmoid units, a KL without a VAE."""
    if "kl_sparsity" in terms and isinstance(model, models.MLPAutoencoder):
        layer = dict(terms["kl_sparsity"]).get("layer", "code")
        act = model.code_activation if layer == "code" else model.activation
        if act != "sigmoid":
            raise ValueError(f"kl_sparsity needs sigmoid units (mean activations in (0, 1)); layer "
                             f"{layer!r} of this model uses {act!r}. Set model.code_activation="
                             "'sigmoid' (or model.activation for hidden layers), or use the 'l1' term.")
    if "kl_sparsity" in terms and not isinstance(model, models.MLPAutoencoder):
        raise ValueError("kl_sparsity is supported on MLPAutoencoder sigmoid layers only.")
    if "kl" in terms and not isinstance(model, models.VAE):
        raise ValueError("The 'kl' term is the VAE's; set model.name='vae' or remove the term.")
