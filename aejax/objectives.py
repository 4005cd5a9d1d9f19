"""Objectives: weighted sums of named terms over one forward pass, every part reported.

A *term* maps a :class:`Forward` (everything a loss may look at: target, input, logits, code,
sown activations, the encoder as a function) to per-example values ``(B,)``. :func:`combine`
adds weighted terms into ``objective(forward) -> (total, parts)``, so a new penalty plugs in
without touching the train step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from aejax import losses, models, quantize, vae

Array = jax.Array
Term = Callable[["Forward"], Array]
Weight = Union[float, Callable[[Array], Array]]


class Forward(NamedTuple):
    """One forward pass, as the terms see it.

    Attributes:
      x: clean targets ``(B, ...)``.
      x_in: model inputs ``(B, ...)`` (``x`` corrupted, for denoising).
      logits: decoder outputs shaped like ``x``.
      code: codes ``(B, H)``, ``aux["code"]`` (the sampled ``z`` for a VAE).
      activations: sown activations by layer name (``"code"``, ``"hidden_0"``, ...).
      mask: ``(B,)`` 1 for real examples, 0 for padding.
      step: the global step (for scheduled weights).
      rng: key for terms that draw randomness (e.g. the contractive estimator).
      model: the flax module.
      params: its parameters.
      extras: the model's ``aux`` outputs (a VAE's ``mean``, ``logvar``, ``log_scale``).
      condition: the labels ``(B,)`` a conditional model was given, else None.
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
    condition: Optional[Array] = None

    def encode(self, x: Array) -> Array:
        """The deterministic encoder (a VAE's posterior mean) at the current parameters; for a
        conditional model ``x`` holds the batch's examples (with their labels ``condition``)."""
        return models.encoder(self.model, self.params, self.condition)(x)

    def decode(self, code: Array) -> Array:
        """The decoder ``(B, H) -> logits`` at the current parameters."""
        return models.decoder(self.model, self.params, self.condition)(code)


def forward(model: nn.Module, params: Any, x: Array, x_in: Array, *, rng: Array,
            step: Array, mask: Optional[Array] = None, condition: Optional[Array] = None) -> Forward:
    """Runs ``model`` on ``x_in`` (with the labels ``condition`` of a conditional model) and
    collects what the terms need."""
    r_model, r_terms = jax.random.split(rng)
    mask = jnp.ones(x.shape[:1], x.dtype) if mask is None else mask
    logits, aux, activations = models.forward(model, params, x_in, r_model, condition)
    return Forward(x=x, x_in=x_in, logits=logits, code=aux["code"], activations=activations,
                   mask=mask, step=step, rng=r_terms, model=model, params=params,
                   extras={k: v for k, v in aux.items() if k != "code"}, condition=condition)


def masked_mean(values: Array, mask: Array) -> Array:
    """Mean of per-example ``values`` over examples where ``mask`` is 1 (padding excluded)."""
    return (values * mask).sum() / jnp.maximum(mask.sum(), 1.0)


# --------------------------------------------------------------------------- reconstruction

RECONSTRUCTIONS = ("bce", "mse", "mse_linear", "gaussian")


def reconstruct(logits: Array, kind: str) -> Array:
    """Reconstructed images from decoder outputs: sigmoid for Bernoulli/sigmoid-MSE, as is otherwise."""
    return logits if kind in ("mse_linear", "gaussian") else jax.nn.sigmoid(logits)


@dataclasses.dataclass(frozen=True)
class Reconstruction:
    """The reconstruction term: per-example loss against the clean target, and the images.

    ``"bce"``: Bernoulli negative log-likelihood of the logits (nats per example);
    ``"mse"``: mean squared error of ``sigmoid(logits)``; ``"mse_linear"``: of the raw outputs
    (linear decoders, the PCA comparison); ``"gaussian"``: Gaussian negative log-likelihood with
    the model's learned ``log_scale`` (``aux["log_scale"]``, 0 when the model has none).

    The objective's metrics read the reconstructed images through :meth:`images`, so the kind
    is said once, here.
    """

    kind: str = "bce"

    def __post_init__(self):
        if self.kind not in RECONSTRUCTIONS:
            raise ValueError(f"Unknown reconstruction {self.kind!r}; choose one of {RECONSTRUCTIONS}.")

    def images(self, logits: Array) -> Array:
        """Reconstructed images from decoder outputs."""
        return reconstruct(logits, self.kind)

    def __call__(self, f: Forward) -> Array:
        if self.kind == "bce":
            return losses.bce_with_logits(f.logits, f.x)
        if self.kind == "gaussian":
            return losses.gaussian_nll(f.logits, f.x, log_scale=f.extras.get("log_scale", 0.0))
        return losses.mse(reconstruct(f.logits, self.kind), f.x)


def reconstruction(kind: str = "bce") -> Reconstruction:
    """Reconstruction term of ``kind`` (see :class:`Reconstruction`)."""
    return Reconstruction(kind)


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
        model allows (the Gram matrix only where the first layer has fewer units than inputs).
      chunk_size: examples at a time, to bound memory.
      num_probes: probes per example for ``"estimate"``.
    """
    if mode not in CONTRACTIVE_TERM_MODES:
        raise ValueError(f"Unknown contractive mode {mode!r}; choose one of {CONTRACTIVE_TERM_MODES}.")

    def term(f: Forward) -> Array:
        layers = models.dense_encoder(f.model, f.params)
        m = mode
        if m == "best":
            acts = [] if layers is None else [layer.activation for layer in layers]
            # The Gram matrix of a first layer of K units over D inputs costs each example
            # H x K^2 products against the generic path's H x K x D: it pays only when K < D.
            narrows = layers is not None and layers[0].kernel.shape[1] < layers[0].kernel.shape[0]
            m = ("auto" if layers is None else "sigmoid" if acts == ["sigmoid"]
                 else "one_hidden" if len(acts) == 2 and acts[1] == "linear"
                 else "dense" if narrows else "auto")
        if m in ("dense", "sigmoid", "one_hidden"):
            if layers is None:
                raise ValueError(f"contractive mode {m!r} needs the encoder's dense layers, which "
                                 f"{type(f.model).__name__} does not offer (dense_layers()); use "
                                 "mode='auto'.")
            return _contractive_dense(m, layers, f, chunk_size)
        return losses.contractive(f.encode, f.x_in, mode=m, chunk_size=chunk_size,
                                  num_probes=num_probes, rng=f.rng)

    return term


def _dense_chain(layers: tuple[models.DenseLayer, ...], h: Array) -> Array:
    for layer in layers:
        h = models.activation(layer.activation)(h @ layer.kernel + layer.bias)
    return h


def _contractive_dense(mode: str, layers: tuple[models.DenseLayer, ...], f: Forward,
                       chunk_size: Optional[int]) -> Array:
    """The exact shortcuts on an encoder given as dense layers."""
    first = layers[0]
    if mode == "sigmoid":
        if len(layers) != 1 or first.activation != "sigmoid":
            raise ValueError("contractive mode 'sigmoid' is the closed form of a one-layer "
                             "sigmoid encoder (MLP: hidden=(), code_activation='sigmoid').")
        return losses.contractive_sigmoid(f.code, first.kernel)
    pre = f.x_in.reshape(f.x_in.shape[0], -1) @ first.kernel + first.bias
    if mode == "one_hidden":
        if len(layers) != 2 or layers[1].activation != "linear":
            raise ValueError("contractive mode 'one_hidden' needs an encoder with one hidden "
                             "layer and a linear code; use mode='dense'.")
        return losses.contractive_one_hidden(models.activation(first.activation), pre,
                                             first.kernel, layers[1].kernel)
    head = lambda p: _dense_chain(layers[1:], models.activation(first.activation)(p))
    return losses.contractive_dense_input(head, first.kernel, pre, chunk_size=chunk_size)


def gaussian_kl() -> Term:
    """VAE term ``KL(q(z|x) || N(0, I))`` in nats per example."""

    def term(f: Forward) -> Array:
        if "mean" not in f.extras:
            raise ValueError(f"The 'kl' term needs a VAE; {type(f.model).__name__} has no "
                             "posterior (use model.name='vae').")
        return losses.gaussian_kl(f.extras["mean"], f.extras["logvar"])

    return term


def _extra(f: Forward, name: str, term: str, model_hint: str) -> Array:
    if name not in f.extras:
        raise ValueError(f"The {term!r} term needs aux[{name!r}], which {type(f.model).__name__} "
                         f"does not return ({model_hint}).")
    return f.extras[name]


_STOCHASTIC = "use model.name='vae'"
_QUANTIZED = "use model.name='vqvae'"


def l2_activity(layer: str = "code") -> Term:
    """Half squared L2 norm ``0.5 sum_i a_i^2`` of ``layer`` (the RAE's code penalty, Ghosh et al. 2020)."""
    return lambda f: losses.l2_activity(_layer(f, layer))


def decoder_jacobian(*, mode: str = "auto", chunk_size: Optional[int] = None,
                     num_probes: int = 1) -> Term:
    """RAE gradient penalty: ``||d decode(z) / d z||_F^2`` at each example's code (Ghosh et al. 2020).

    The squared Frobenius norm of the decoder's Jacobian (of its outputs, the logits) with
    respect to the code ``z = aux["code"]``, exact through :func:`aejax.losses.contractive`
    (``"auto"``: one JVP per code unit, since codes are smaller than images).

    Args:
      mode: one of :data:`aejax.losses.CONTRACTIVE_MODES`.
      chunk_size: examples at a time, to bound memory.
      num_probes: probes per example for ``"estimate"``.
    """
    if mode not in losses.CONTRACTIVE_MODES:
        raise ValueError(f"Unknown decoder_jacobian mode {mode!r}; choose one of "
                         f"{losses.CONTRACTIVE_MODES}.")

    def term(f: Forward) -> Array:
        decode = lambda z: f.decode(z).reshape(z.shape[0], -1)
        return losses.contractive(decode, f.code, mode=mode, chunk_size=chunk_size,
                                  num_probes=num_probes, rng=f.rng)

    return term


def mmd(*, kernel: str = "imq", sigma: float = 1.0,
        scales: tuple[float, ...] = (1.0,)) -> Term:
    """WAE-MMD penalty (Tolstikhin et al. 2018): unbiased ``MMD^2`` of the codes to ``N(0, I)``.

    Prior samples, as many as the batch's examples, are drawn from the term's key; the kernel
    scale is ``C = 2 H sigma^2`` for codes of size ``H`` (the paper's choice with ``sigma`` the
    prior's standard deviation, 1), times each factor of ``scales`` (the paper's code sums the
    kernel over several). A batch value, given to each example; padded rows are left out.

    Args:
      kernel: ``"imq"`` or ``"rbf"`` (:data:`aejax.losses.MMD_KERNELS`).
      sigma: ``sigma`` of the scale, > 0.
      scales: factors of ``C``, each > 0.
    """
    if kernel not in losses.MMD_KERNELS:
        raise ValueError(f"mmd: unknown kernel {kernel!r}; choose one of "
                         f"{sorted(losses.MMD_KERNELS)}.")
    factors = tuple(float(s) for s in scales)
    if not (sigma > 0 and math.isfinite(sigma)) or not factors or min(factors) <= 0:
        raise ValueError(f"mmd: sigma and scales must be positive, got sigma={sigma}, "
                         f"scales={scales}.")

    def term(f: Forward) -> Array:
        code = f.code.reshape(f.code.shape[0], -1)
        prior = jax.random.normal(f.rng, code.shape, code.dtype)
        base = 2.0 * code.shape[1] * sigma ** 2
        value = losses.mmd(code, prior, kernel=kernel, scales=tuple(base * c for c in factors),
                           mask_x=f.mask, mask_y=f.mask)
        return jnp.broadcast_to(value, code.shape[:1])

    return term


def _tc_part(part: str, dataset_size: Optional[int]) -> Term:
    if dataset_size is None or isinstance(dataset_size, bool) or int(dataset_size) != dataset_size \
            or dataset_size < 1:
        raise ValueError(f"{part} needs dataset_size=N >= 1, the number of training examples "
                         f"(the minibatch-weighted estimator's log(N M)); got {dataset_size!r}.")

    def term(f: Forward) -> Array:
        mean = _extra(f, "mean", part, _STOCHASTIC)
        logvar = _extra(f, "logvar", part, _STOCHASTIC)
        parts = losses.tc_decomposition(f.code, mean, logvar, dataset_size=int(dataset_size),
                                        mask=f.mask)
        return getattr(parts, part)

    return term


def index_code_mi(*, dataset_size: Optional[int] = None) -> Term:
    """beta-TCVAE index-code mutual information ``log q(z|x) - log q(z)`` (weight alpha).

    Minibatch-weighted sampling (Chen et al. 2018), :func:`aejax.losses.tc_decomposition`.

    Args:
      dataset_size: ``N``, the number of training examples.
    """
    return _tc_part("index_code_mi", dataset_size)


def total_correlation(*, dataset_size: Optional[int] = None) -> Term:
    """beta-TCVAE total correlation ``log q(z) - sum_d log q(z_d)`` (weight beta).

    Args:
      dataset_size: ``N``, the number of training examples.
    """
    return _tc_part("total_correlation", dataset_size)


def dimwise_kl(*, dataset_size: Optional[int] = None) -> Term:
    """beta-TCVAE dimension-wise KL ``sum_d log q(z_d) - log p(z_d)`` (weight gamma).

    Args:
      dataset_size: ``N``, the number of training examples.
    """
    return _tc_part("dimwise_kl", dataset_size)


def iwae(*, num_samples: int = 5) -> Term:
    """IWAE training objective: minus the importance-weighted bound with ``k`` samples (Burda et al. 2016).

    The bound of :func:`aejax.vae.iwae` on the clean target, with the posterior of the forward
    pass (``aux["mean"]``, ``aux["logvar"]``) and sample ``k`` drawn from ``fold_in(rng, k)`` of
    the term's key, so it equals ``-vae.iwae(model, params, x, rng, num_samples=k)``. ``k = 1``
    is a single-sample estimate of minus the ELBO. Train with it alone: set
    ``loss.reconstruction_weight`` to 0 (the ``kl`` term at weight 0 still reports the ELBO).

    Args:
      num_samples: ``k >= 1``.
    """
    if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(f"iwae: num_samples must be an integer >= 1, got {num_samples!r}.")

    def term(f: Forward) -> Array:
        posterior = (_extra(f, "mean", "iwae", _STOCHASTIC), _extra(f, "logvar", "iwae", _STOCHASTIC))
        return -vae.iwae(f.model, f.params, f.x, f.rng, num_samples=int(num_samples),
                         posterior=posterior)

    return term


def codebook() -> Term:
    """VQ-VAE codebook loss ``||sg(z_e) - e||^2`` (:func:`aejax.losses.vq_codebook`)."""
    return lambda f: losses.vq_codebook(_extra(f, "encoding", "codebook", _QUANTIZED),
                                        _extra(f, "codeword", "codebook", _QUANTIZED))


def commitment() -> Term:
    """VQ-VAE commitment loss ``||z_e - sg(e)||^2`` (weight beta, 0.25 in the paper)."""
    return lambda f: losses.vq_commitment(_extra(f, "encoding", "commitment", _QUANTIZED),
                                          _extra(f, "codeword", "commitment", _QUANTIZED))


def _codebook_statistic(name: str, statistic: Callable[[Array, Array], Array]) -> Term:
    def term(f: Forward) -> Array:
        counts = _extra(f, "code_counts", name, _QUANTIZED)
        return jnp.broadcast_to(statistic(counts, f.mask), counts.shape[:1])

    return term


def codebook_perplexity() -> Term:
    """The batch's codebook perplexity (:func:`aejax.quantize.perplexity`), given to each example.

    A diagnostic without gradient: give it weight 0 to report it.
    """
    return _codebook_statistic("codebook_perplexity", quantize.perplexity)


def codebook_usage() -> Term:
    """Fraction of codewords the batch uses (:func:`aejax.quantize.usage`), given to each example.

    A diagnostic without gradient: give it weight 0 to report it.
    """
    return _codebook_statistic("codebook_usage", quantize.usage)


# --------------------------------------------------------------------------- combination


def linear_warmup(weight: float, steps: int) -> Callable[[Array], Array]:
    """A weight that rises linearly from 0 to ``weight`` over ``steps`` steps (KL warm-up)."""
    if steps <= 0:
        return lambda step: jnp.asarray(weight, jnp.float32)
    return lambda step: weight * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / steps)


@dataclasses.dataclass(frozen=True, eq=False)
class Objective:
    """A weighted sum of named terms: ``objective(forward) -> (total (B,), parts)``.

    ``parts[name]`` is the unweighted ``(B,)`` value of each term. Build it with :func:`combine`.

    Attributes:
      terms: ``{name: (weight, term)}``.
    """

    terms: Mapping[str, tuple[Weight, Term]]

    def __call__(self, f: Forward) -> tuple[Array, dict[str, Array]]:
        parts = {name: term(f) for name, (_, term) in self.terms.items()}
        total = 0.0
        for name, (w, _) in self.terms.items():
            weight = w(f.step) if callable(w) else w
            total = total + weight * parts[name]
        return total, parts

    @property
    def reconstruction(self) -> Optional[Reconstruction]:
        """The objective's reconstruction term (the first), or None."""
        return next((t for _, t in self.terms.values() if isinstance(t, Reconstruction)), None)


def combine(terms: Mapping[str, tuple[Weight, Term]]) -> Objective:
    """Weighted sum of named terms.

    Args:
      terms: ``{name: (weight, term)}``; a weight is a non-negative float or a function of the
        step (a schedule).

    Returns:
      The :class:`Objective`.

    >>> import jax.numpy as jnp
    >>> obj = combine({"rec": (1.0, reconstruction("mse")), "l1": (0.5, l1_activity("code"))})
    >>> f = Forward(x=jnp.ones((1, 2)), x_in=jnp.ones((1, 2)), logits=jnp.zeros((1, 2)),
    ...             code=jnp.array([[1.0, -3.0]]), activations={"code": jnp.array([[1.0, -3.0]])},
    ...             mask=jnp.ones(1), step=0, rng=None, model=None, params=None, extras={})
    >>> total, parts = obj(f)  # mse of sigmoid(0) = 0.5 against 1, and |1| + |-3|
    >>> float(parts["rec"][0]), float(parts["l1"][0]), float(total[0])
    (0.25, 4.0, 2.25)
    """
    if not terms:
        raise ValueError("combine: an objective needs at least one term.")
    for name, (w, _) in terms.items():
        if not callable(w) and (not math.isfinite(float(w)) or float(w) < 0):
            raise ValueError(f"Term {name!r} has weight {w}; weights must be finite and >= 0.")
    return Objective(dict(terms))


TERMS: dict[str, Callable[..., Term]] = {
    "l1": l1_activity,
    "kl_sparsity": kl_sparsity,
    "contractive": contractive,
    "kl": gaussian_kl,
    "l2_activity": l2_activity,
    "decoder_jacobian": decoder_jacobian,
    "mmd": mmd,
    "index_code_mi": index_code_mi,
    "total_correlation": total_correlation,
    "dimwise_kl": dimwise_kl,
    "iwae": iwae,
    "codebook": codebook,
    "commitment": commitment,
    "codebook_perplexity": codebook_perplexity,
    "codebook_usage": codebook_usage,
}

# Terms that read a posterior (aux["mean"], aux["logvar"]), and those that read a quantizer's aux.
POSTERIOR_TERMS = ("kl", "index_code_mi", "total_correlation", "dimwise_kl", "iwae")
QUANTIZER_TERMS = ("codebook", "commitment", "codebook_perplexity", "codebook_usage")


def build(reconstruction_kind: str, terms: Mapping[str, Mapping[str, Any]], *,
          reconstruction_weight: float = 1.0) -> Objective:
    """Objective from configuration: a reconstruction term plus ``{kind: {weight, options...}}``.

    A term's options are its factory's keyword arguments; ``warmup_steps`` makes the weight rise
    linearly from 0. Example: ``build("bce", {"contractive": {"weight": 0.1}})``. The
    reconstruction term is always there (its images give the error metrics); at
    ``reconstruction_weight=0`` it is reported but not trained (an objective of the ``iwae``
    term alone).
    """
    if not math.isfinite(float(reconstruction_weight)) or float(reconstruction_weight) < 0:
        raise ValueError(f"The reconstruction weight is {reconstruction_weight}; weights must be "
                         "finite and >= 0.")
    spec: dict[str, tuple[Weight, Term]] = {
        "reconstruction": (float(reconstruction_weight), reconstruction(reconstruction_kind))}
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


def check_compatible(model: nn.Module, params: Any, x: Array,
                     terms: Mapping[str, Mapping[str, Any]]) -> None:
    """Errors that can be found before training, from one forward pass on the batch ``x``.

    A KL sparsity needs mean activations in (0, 1) (sigmoid units): the layer's values on ``x``
    must lie in [0, 1]. The KL, total-correlation and IWAE terms need a stochastic model
    (``aux["mean"]``, ``aux["logvar"]``; IWAE also ``posterior`` and ``decode``), the VQ terms a
    quantizer's ``aux``, the decoder penalty a ``decode`` that runs on codes.
    """
    condition = models.stand_in_condition(model, x)
    _, aux, activations = models.forward(model, params, x, jax.random.PRNGKey(0), condition)
    name = type(model).__name__
    for kind in (k for k in POSTERIOR_TERMS if k in terms):
        if not ("mean" in aux and "logvar" in aux):
            raise ValueError(f"The {kind!r} term needs a stochastic encoder (aux['mean'], "
                             f"aux['logvar']); {name} has none. Set model.name='vae' or remove "
                             "the term.")
    if "iwae" in terms and not all(callable(getattr(model, m, None)) for m in ("posterior", "decode")):
        raise ValueError(f"The 'iwae' term needs a model with posterior(x) and decode(z) (as "
                         f"aejax.models.VAE has); {name} lacks them. Set model.name='vae'.")
    for kind in (k for k in QUANTIZER_TERMS if k in terms):
        missing = sorted({"encoding", "codeword", "code_counts"} - set(aux))
        if missing:
            raise ValueError(f"The {kind!r} term needs a vector-quantized model (aux {missing}); "
                             f"{name} has none. Set model.name='vqvae' or remove the term.")
    if "decoder_jacobian" in terms:
        try:
            jax.eval_shape(models.decoder(model, params, condition), aux["code"])
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"The 'decoder_jacobian' term needs model.decode(code) on codes "
                             f"alone; on {name} it fails: {e}") from None
    if "kl_sparsity" in terms:
        layer = dict(terms["kl_sparsity"]).get("layer", "code")
        if layer not in activations:
            raise ValueError(f"kl_sparsity: no activations named {layer!r} in "
                             f"{type(model).__name__}; available: {sorted(activations)}.")
        a = activations[layer]
        lo, hi = float(jnp.min(a)), float(jnp.max(a))
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"kl_sparsity needs sigmoid units (mean activations in (0, 1)); layer "
                             f"{layer!r} of {type(model).__name__} has values in [{lo:.3g}, "
                             f"{hi:.3g}]. Set model.code_activation='sigmoid' (or "
                             "model.activation for hidden layers), or use the 'l1' term.")
