"""Autoencoder models as flax.linen modules, and the one protocol every aejax model follows.

The protocol (a user's own ``nn.Module`` follows it in a few lines):

* ``model(x) -> (logits, aux)``: decoder outputs shaped like ``x`` and a dict with
  ``aux["code"]`` ``(B, H)``. A stochastic encoder also returns the posterior, ``aux["mean"]``
  and ``aux["logvar"]`` (and ``aux["log_scale"]`` for a Gaussian likelihood), and draws its
  noise from ``self.make_rng(SAMPLE_RNG)``.
* ``model.encode(x) -> code`` ``(B, H)``, deterministic (a stochastic encoder's posterior mean);
  ``model.decode(code) -> logits`` where the decoder can run on codes alone.
* Hidden activations sown into the ``intermediates`` collection under layer names, so penalties
  reach any layer (``self.sow("intermediates", "hidden_0", h)``).
* Conditional models (a class attribute ``conditional = True``, e.g. :class:`CVAE`) take the
  examples' integer labels as a second argument everywhere: ``model(x, y)``, ``encode(x, y)``,
  ``decode(code, y)``; the training loop passes ``batch["y"]``.
* Optional: ``dense_layers() -> tuple[DenseLayer, ...]``, the encoder written as a chain of
  dense layers on the flattened input; the exact contractive shortcuts use it. A stochastic
  model offers ``posterior(x) -> (mean, logvar)`` and ``decoder_log_scale()`` for
  :mod:`aejax.vae`.

Everything outside this module reaches models through the functions at its end (:func:`init`,
:func:`forward`, :func:`encoder`, :func:`dense_encoder`, :func:`describe`,
:func:`reconstruct_logits`); none of them asks which class a model is.
"""

from __future__ import annotations

import functools
import importlib
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from aejax import convolution, pooling, quantize

Array = jax.Array

# The rng stream a stochastic model draws its sampling noise from (``self.make_rng(SAMPLE_RNG)``).
SAMPLE_RNG = "sample"


class DenseLayer(NamedTuple):
    """One layer of an encoder offered through ``dense_layers()``: ``activation(h @ kernel + bias)``.

    Attributes:
      kernel: ``(inputs, outputs)``; the first layer's inputs are the flattened image.
      bias: ``(outputs,)``.
      activation: a name in :data:`ACTIVATIONS` (the shortcuts recognise ``"sigmoid"`` and
        ``"linear"``).
    """

    kernel: Array
    bias: Array
    activation: str

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": nn.relu,
    "sigmoid": nn.sigmoid,
    "tanh": jnp.tanh,
    "linear": lambda x: x,
    "elu": nn.elu,
    "gelu": nn.gelu,
    "softplus": nn.softplus,
    "leaky_relu": nn.leaky_relu,
}


def activation(name: str) -> Callable[[Array], Array]:
    """The activation function called ``name``; a clear error for an unknown one."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"Unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}.") from None


def check_input(x: Array, feature_shape: Sequence[int], model: str) -> None:
    """Raises a clear error unless ``x`` is a floating batch of shape ``(B, *feature_shape)``."""
    if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{model}: inputs have dtype {getattr(x, 'dtype', type(x).__name__)}; a "
                        "floating dtype is needed (scale images with x.astype('float32') / 255).")
    if tuple(x.shape[1:]) != tuple(feature_shape) or x.ndim != len(feature_shape) + 1:
        hint = (" Load data with flat=True for MLP models, or set the model's input_shape."
                if math.prod(x.shape[1:]) == math.prod(feature_shape) else "")
        raise ValueError(f"{model}: expected inputs of shape (B, {', '.join(map(str, feature_shape))}), "
                         f"got {tuple(x.shape)}.{hint}")
    if x.shape[0] == 0:
        raise ValueError(f"{model}: the batch is empty (shape {tuple(x.shape)}); pass at least one "
                         "example.")


class MLPAutoencoder(nn.Module):
    """Fully connected autoencoder ``D - hidden... - code - ...hidden - D``.

    Covers the vanilla 784-64-784 (``hidden=()``), the multilayer 784-128-32-128-784 and Hinton &
    Salakhutdinov's 784-1000-500-250-30 (``code_activation='linear'``). With ``tied=True`` the
    decoder uses the transposes of the encoder's weight matrices and its own biases.

    Attributes:
      input_shape: per-example input shape, e.g. ``(784,)`` or ``(28, 28, 1)``.
      hidden: widths of the encoder's hidden layers (the decoder mirrors them).
      code_size: width of the code.
      activation: hidden-layer activation name.
      code_activation: activation of the code layer.
      tied: share the encoder's weight matrices (transposed) with the decoder.
    """

    input_shape: Sequence[int] = (784,)
    hidden: Sequence[int] = (128,)
    code_size: int = 32
    activation: str = "relu"
    code_activation: str = "linear"
    tied: bool = False

    def setup(self):
        activation(self.activation), activation(self.code_activation)  # validate names early
        if self.code_size <= 0 or any(w <= 0 for w in self.hidden):
            raise ValueError(f"MLPAutoencoder: widths must be positive, got hidden={self.hidden}, "
                             f"code_size={self.code_size}.")
        dims = (math.prod(self.input_shape), *self.hidden, self.code_size)
        self.encoder_layers = [nn.Dense(d, name=f"encoder_{i}") for i, d in enumerate(dims[1:])]
        out_dims = tuple(reversed(dims[:-1]))
        if self.tied:
            self.decoder_biases = [self.param(f"decoder_{i}_bias", nn.initializers.zeros, (d,))
                                   for i, d in enumerate(out_dims)]
        else:
            self.decoder_layers = [nn.Dense(d, name=f"decoder_{i}") for i, d in enumerate(out_dims)]

    def _act(self, i: int) -> str:
        return self.code_activation if i == len(self.hidden) else self.activation

    def encode(self, x: Array) -> Array:
        """Codes ``(B, code_size)``."""
        check_input(x, self.input_shape, "MLPAutoencoder")
        h = x.reshape(x.shape[0], -1)
        for i, layer in enumerate(self.encoder_layers):
            if i:
                self.sow("intermediates", f"hidden_{i - 1}", h)
            h = activation(self._act(i))(layer(h))
        self.sow("intermediates", "code", h)
        return h

    def dense_layers(self) -> tuple[DenseLayer, ...]:
        """The encoder as a chain of dense layers (the exact contractive shortcuts use it)."""
        return tuple(DenseLayer(layer.variables["params"]["kernel"],
                                layer.variables["params"]["bias"], self._act(i))
                     for i, layer in enumerate(self.encoder_layers))

    def decode(self, z: Array) -> Array:
        """Logits shaped ``(B, *input_shape)``."""
        if z.ndim != 2 or z.shape[1] != self.code_size:
            raise ValueError(f"MLPAutoencoder.decode: expected codes of shape (B, {self.code_size}), "
                             f"got {tuple(z.shape)}.")
        h = z
        n = len(self.encoder_layers)
        act = activation(self.activation)
        for i in range(n):
            if self.tied:
                kernel = self.encoder_layers[n - 1 - i].variables["params"]["kernel"]
                h = h @ kernel.T + self.decoder_biases[i]
            else:
                h = self.decoder_layers[i](h)
            if i < n - 1:
                h = act(h)
                self.sow("intermediates", f"decoder_hidden_{i}", h)
        return h.reshape((z.shape[0], *self.input_shape))

    def __call__(self, x: Array) -> tuple[Array, dict[str, Array]]:
        """Returns ``(logits, {"code": code})``."""
        code = self.encode(x)
        return self.decode(code), {"code": code}


class ConvAutoencoder(nn.Module):
    """The lecture notes' convolutional autoencoder on 28x28x1 images.

    Encoder Conv16-Pool-Conv8-Pool-Conv8-Pool (code 4x4x8, flattened to 128); decoder
    Conv8-Up-Conv8-Up-Conv16(valid)-Up-Conv1, output logits 28x28x1. ``upsampling='transpose'``
    replaces each Up+Conv by a stride-2 transposed convolution ("deconvolution");
    ``upsampling='unpool'`` decodes Conv8-Unpool-Conv8-Unpool-Conv16-Unpool-Conv1, each unpooling
    putting values back where the matching encoder pooling found its maxima (the switches), so
    the decoder mirrors the encoder's sizes (4 -> 7 -> 14 -> 28).

    Attributes:
      features: encoder conv widths; the decoder mirrors them.
      activation: activation name.
      upsampling: ``"nearest"``, ``"transpose"`` or ``"unpool"``.
      conv_lowering: how the 3 x 3 convolutions are computed (:mod:`aejax.convolution`):
        ``"auto"`` (default), on a CPU, computes the layers with at most 4 input channels (here
        the first, on the one-channel image) as shifted slices and one matrix product, and a
        layer with one output channel (here the last) products first, its kernel gradient from
        the output gradient's shifted views, where XLA's convolution is slow for them; XLA's
        convolution elsewhere. ``"xla"`` always uses XLA's convolution; ``"shifted"`` these
        forms on every backend. The parameters are the same either way, and so are the values
        and gradients up to float rounding.
    """

    input_shape: Sequence[int] = (28, 28, 1)
    features: Sequence[int] = (16, 8, 8)
    activation: str = "relu"
    upsampling: str = "nearest"
    conv_lowering: str = "auto"

    def setup(self):
        if tuple(self.input_shape) != (28, 28, 1):
            raise ValueError(f"ConvAutoencoder is built for (28, 28, 1) images, got input_shape="
                             f"{tuple(self.input_shape)}.")
        if self.upsampling not in ("nearest", "transpose", "unpool"):
            raise ValueError(f"ConvAutoencoder: unknown upsampling {self.upsampling!r}; choose "
                             "'nearest', 'transpose' or 'unpool'.")
        activation(self.activation)
        conv = functools.partial(nn.Conv,
                                 conv_general_dilated=convolution.for_lowering(self.conv_lowering))
        f1, f2, f3 = self.features
        self.enc = [conv(f, (3, 3), padding="SAME", name=f"encoder_{i}")
                    for i, f in enumerate((f1, f2, f3))]
        if self.upsampling == "nearest":
            self.dec = [conv(f3, (3, 3), padding="SAME", name="decoder_0"),
                        conv(f2, (3, 3), padding="SAME", name="decoder_1"),
                        conv(f1, (3, 3), padding="VALID", name="decoder_2")]
        elif self.upsampling == "unpool":
            self.dec = [conv(f, (3, 3), padding="SAME", name=f"decoder_{i}")
                        for i, f in enumerate((f3, f2, f1))]
        else:
            # 4 -> 8 -> 16 -> 14 (valid conv) -> 28, the same sizes as the nearest path.
            self.dec = [nn.ConvTranspose(f3, (2, 2), strides=(2, 2), name="decoder_0"),
                        nn.ConvTranspose(f2, (2, 2), strides=(2, 2), name="decoder_1"),
                        conv(f1, (3, 3), padding="VALID", name="decoder_2"),
                        nn.ConvTranspose(f1, (2, 2), strides=(2, 2), name="decoder_3")]
        self.out = conv(1, (3, 3), padding="SAME", name="decoder_out")

    @property
    def code_shape(self) -> tuple[int, int, int]:
        return (4, 4, self.features[2])

    def first_layer_kernel(self) -> Array:
        """The first convolution's kernel ``(3, 3, 1, features[0])`` (its filters)."""
        return self.enc[0].variables["params"]["kernel"]

    def encode_with_switches(self, x: Array) -> tuple[Array, list[Array]]:
        """Codes and the argmax switches of each pooling layer (first to last)."""
        check_input(x, self.input_shape, "ConvAutoencoder")
        act = activation(self.activation)
        h = x
        switches = []
        for i, conv in enumerate(self.enc):
            h = act(conv(h))
            self.sow("intermediates", f"hidden_{i}", h)
            h, s = pooling.max_pool_with_switches(h, 2, padding="SAME")
            switches.append(s)
        code = h.reshape(h.shape[0], -1)
        self.sow("intermediates", "code", code)
        return code, switches

    def encode(self, x: Array) -> Array:
        """Codes ``(B, 4 * 4 * features[2])`` (flattened so latent-space tools see ``(B, H)``)."""
        return self.encode_with_switches(x)[0]

    def decode(self, z: Array, switches: Optional[Sequence[Array]] = None) -> Array:
        """Logits ``(B, 28, 28, 1)``; ``switches`` (from the encoder) are needed for ``'unpool'``."""
        size = math.prod(self.code_shape)
        if z.ndim != 2 or z.shape[1] != size:
            raise ValueError(f"ConvAutoencoder.decode: expected codes of shape (B, {size}), got "
                             f"{tuple(z.shape)}.")
        act = activation(self.activation)
        h = z.reshape((z.shape[0], *self.code_shape))
        if self.upsampling == "unpool":
            if switches is None:
                raise ValueError("ConvAutoencoder(upsampling='unpool').decode needs the encoder's "
                                 "switches: use model.apply(params, x), or encode_with_switches "
                                 "and pass switches=.")
            sizes = ((7, 7), (14, 14), (28, 28))
            for conv, s, hw in zip(self.dec, reversed(switches), sizes):
                h = pooling.max_unpool(act(conv(h)), s, 2, output_hw=hw)
        elif self.upsampling == "nearest":
            for conv in self.dec:
                h = pooling.upsample_nearest(act(conv(h)), 2)
        else:
            for layer in self.dec:
                h = act(layer(h))
        return self.out(h)

    def __call__(self, x: Array) -> tuple[Array, dict[str, Array]]:
        code, switches = self.encode_with_switches(x)
        return self.decode(code, switches), {"code": code}


def _mlp_encoder_body(module: nn.Module, x: Array, layers: Sequence[nn.Dense]) -> Array:
    """The hidden layers of an MLP encoder on flattened ``x``, each sown as ``hidden_i``."""
    act = activation(module.activation)
    h = x.reshape(x.shape[0], -1)
    for i, layer in enumerate(layers):
        h = act(layer(h))
        module.sow("intermediates", f"hidden_{i}", h)
    return h


def _mlp_decoder(module: nn.Module, z: Array, size: int, what: str) -> Array:
    """``module.out`` after ``module.dec`` on codes ``z`` ``(B, size)``, shaped like the input."""
    if z.ndim != 2 or z.shape[1] != size:
        raise ValueError(f"{type(module).__name__}.decode: expected {what} of shape (B, {size}), "
                         f"got {tuple(z.shape)}.")
    act = activation(module.activation)
    h = z
    for layer in module.dec:
        h = act(layer(h))
    return module.out(h).reshape((z.shape[0], *module.input_shape))


class VAE(nn.Module):
    """Variational autoencoder with a diagonal Gaussian encoder and an MLP decoder.

    ``posterior`` returns ``(mean, logvar)`` of ``q(z|x)`` and ``encode`` the mean; ``decode``
    returns Bernoulli logits (or Gaussian means for ``likelihood='gaussian'``, with a learned
    global log standard deviation ``log_scale``). The call draws ``z`` by reparameterization
    from the ``SAMPLE_RNG`` stream (``model.apply(v, x, rngs={"sample": key})``).

    Attributes:
      input_shape: per-example input shape.
      hidden: encoder hidden widths (the decoder mirrors them).
      latent_size: dimension of ``z``.
      activation: hidden activation name.
      likelihood: ``"bernoulli"`` or ``"gaussian"``.
    """

    input_shape: Sequence[int] = (784,)
    hidden: Sequence[int] = (512,)
    latent_size: int = 2
    activation: str = "relu"
    likelihood: str = "bernoulli"

    def setup(self):
        if self.likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"VAE: unknown likelihood {self.likelihood!r}; choose 'bernoulli' or "
                             "'gaussian'.")
        activation(self.activation)
        self.enc = [nn.Dense(w, name=f"encoder_{i}") for i, w in enumerate(self.hidden)]
        self.mean_layer = nn.Dense(self.latent_size, name="encoder_mean")
        self.logvar_layer = nn.Dense(self.latent_size, name="encoder_logvar")
        self.dec = [nn.Dense(w, name=f"decoder_{i}") for i, w in enumerate(reversed(self.hidden))]
        self.out = nn.Dense(math.prod(self.input_shape), name="decoder_out")
        if self.likelihood == "gaussian":
            self.log_scale = self.param("log_scale", nn.initializers.zeros, ())

    def posterior(self, x: Array) -> tuple[Array, Array]:
        """``(mean, logvar)`` of ``q(z|x)``, each ``(B, latent_size)``."""
        check_input(x, self.input_shape, "VAE")
        h = _mlp_encoder_body(self, x, self.enc)
        return self.mean_layer(h), self.logvar_layer(h)

    def encode(self, x: Array) -> Array:
        """The posterior mean ``(B, latent_size)``: the deterministic code."""
        return self.posterior(x)[0]

    def dense_layers(self) -> tuple[DenseLayer, ...]:
        """The encoder of the posterior mean as a chain of dense layers."""
        p = lambda layer: layer.variables["params"]
        hidden = tuple(DenseLayer(p(layer)["kernel"], p(layer)["bias"], self.activation)
                       for layer in self.enc)
        return hidden + (DenseLayer(p(self.mean_layer)["kernel"], p(self.mean_layer)["bias"],
                                    "linear"),)

    def decode(self, z: Array) -> Array:
        """Logits (or means) shaped ``(B, *input_shape)``."""
        return _mlp_decoder(self, z, self.latent_size, "latents")

    def decoder_log_scale(self) -> Array:
        """The Gaussian likelihood's log standard deviation (0 for Bernoulli models)."""
        return self.log_scale if self.likelihood == "gaussian" else jnp.zeros(())

    def __call__(self, x: Array) -> tuple[Array, dict[str, Array]]:
        """``(logits, aux)``: ``z`` drawn by reparameterization is ``aux["code"]``; ``aux`` also
        holds ``mean``, ``logvar`` and ``log_scale``."""
        mean, logvar = self.posterior(x)
        noise = jax.random.normal(self.make_rng(SAMPLE_RNG), mean.shape, mean.dtype)
        z = mean + jnp.exp(0.5 * logvar) * noise
        return self.decode(z), {"code": z, "mean": mean, "logvar": logvar,
                                "log_scale": self.decoder_log_scale()}



class CVAE(nn.Module):
    """Conditional VAE (Sohn et al. 2015): :class:`VAE` with the label in encoder and decoder.

    ``q(z|x, y)`` sees the flattened image with the one-hot label appended, ``p(x|z, y)`` the code
    with the one-hot label appended; the prior is ``N(0, I)`` for every class. Generation of a
    chosen class decodes ``z ~ N(0, I)`` with that label (``decode(z, y)``). A conditional model:
    every call takes the labels ``y`` ``(B,)`` (integers in ``[0, num_classes)``) as its second
    argument.

    Attributes:
      input_shape: per-example input shape.
      num_classes: number of labels.
      hidden: encoder hidden widths (the decoder mirrors them).
      latent_size: dimension of ``z``.
      activation: hidden activation name.
    """

    conditional = True  # a class attribute, not a field: the protocol's marker

    input_shape: Sequence[int] = (784,)
    num_classes: int = 10
    hidden: Sequence[int] = (512,)
    latent_size: int = 2
    activation: str = "relu"

    def setup(self):
        activation(self.activation)
        if self.num_classes < 2:
            raise ValueError(f"CVAE: num_classes must be at least 2, got {self.num_classes}.")
        self.enc = [nn.Dense(w, name=f"encoder_{i}") for i, w in enumerate(self.hidden)]
        self.mean_layer = nn.Dense(self.latent_size, name="encoder_mean")
        self.logvar_layer = nn.Dense(self.latent_size, name="encoder_logvar")
        self.dec = [nn.Dense(w, name=f"decoder_{i}") for i, w in enumerate(reversed(self.hidden))]
        self.out = nn.Dense(math.prod(self.input_shape), name="decoder_out")

    def _with_label(self, h: Array, y: Array) -> Array:
        if y.shape != h.shape[:1] or not jnp.issubdtype(y.dtype, jnp.integer):
            raise ValueError(f"CVAE: labels must be integers of shape ({h.shape[0]},), got "
                             f"{y.dtype} {tuple(y.shape)}.")
        return jnp.concatenate([h, jax.nn.one_hot(y, self.num_classes, dtype=h.dtype)], axis=1)

    def posterior(self, x: Array, y: Array) -> tuple[Array, Array]:
        """``(mean, logvar)`` of ``q(z|x, y)``, each ``(B, latent_size)``."""
        check_input(x, self.input_shape, "CVAE")
        h = self._with_label(x.reshape(x.shape[0], -1), y)
        act = activation(self.activation)
        for i, layer in enumerate(self.enc):
            h = act(layer(h))
            self.sow("intermediates", f"hidden_{i}", h)
        return self.mean_layer(h), self.logvar_layer(h)

    def encode(self, x: Array, y: Array) -> Array:
        """The posterior mean ``(B, latent_size)``."""
        return self.posterior(x, y)[0]

    def decode(self, z: Array, y: Array) -> Array:
        """Bernoulli logits ``(B, *input_shape)`` of ``p(x|z, y)``."""
        if z.ndim != 2 or z.shape[1] != self.latent_size:
            raise ValueError(f"CVAE.decode: expected latents of shape (B, {self.latent_size}), "
                             f"got {tuple(z.shape)}.")
        act = activation(self.activation)
        h = self._with_label(z, y)
        for layer in self.dec:
            h = act(layer(h))
        return self.out(h).reshape((z.shape[0], *self.input_shape))

    def decoder_log_scale(self) -> Array:
        return jnp.zeros(())

    def __call__(self, x: Array, y: Array) -> tuple[Array, dict[str, Array]]:
        """``(logits, aux)`` as :class:`VAE`'s, given the labels ``y``."""
        mean, logvar = self.posterior(x, y)
        noise = jax.random.normal(self.make_rng(SAMPLE_RNG), mean.shape, mean.dtype)
        z = mean + jnp.exp(0.5 * logvar) * noise
        return self.decode(z, y), {"code": z, "mean": mean, "logvar": logvar,
                                   "log_scale": self.decoder_log_scale()}


class VQVAE(nn.Module):
    """VQ-VAE (van den Oord et al. 2017) with MLP encoder and decoder.

    The encoder maps an image to ``num_latents`` vectors of size ``code_dim``; each is replaced
    by its nearest codeword of a learned codebook of ``num_codes`` (:class:`aejax.quantize.
    VectorQuantizer`), and the decoder reads the codewords. Gradients pass the quantization
    straight through, so the codebook learns only from the ``codebook`` loss term and the
    encoder is held near it by the ``commitment`` term.

    ``aux`` holds, beside the ``code`` (the quantized latents, flattened to ``(B, num_latents *
    code_dim)``), the encoder outputs ``encoding`` and the chosen codewords ``codeword`` (the
    same shape; the terms' inputs) and ``code_counts`` ``(B, num_codes)`` (how many latents of
    each example chose each codeword: the codebook-use metrics).

    Attributes:
      input_shape: per-example input shape.
      hidden: encoder hidden widths (the decoder mirrors them).
      num_latents: vectors quantized per example.
      code_dim: size of each vector and codeword.
      num_codes: size of the codebook.
      activation: hidden activation name.
    """

    input_shape: Sequence[int] = (784,)
    hidden: Sequence[int] = (256,)
    num_latents: int = 16
    code_dim: int = 8
    num_codes: int = 64
    activation: str = "relu"

    def setup(self):
        activation(self.activation)
        if min(self.num_latents, self.code_dim, self.num_codes, *self.hidden) <= 0:
            raise ValueError(f"VQVAE: sizes must be positive, got hidden={self.hidden}, "
                             f"num_latents={self.num_latents}, code_dim={self.code_dim}, "
                             f"num_codes={self.num_codes}.")
        self.enc = [nn.Dense(w, name=f"encoder_{i}") for i, w in enumerate(self.hidden)]
        self.enc_out = nn.Dense(self.num_latents * self.code_dim, name="encoder_out")
        self.quantizer = quantize.VectorQuantizer(self.num_codes, self.code_dim, name="quantizer")
        self.dec = [nn.Dense(w, name=f"decoder_{i}") for i, w in enumerate(reversed(self.hidden))]
        self.out = nn.Dense(math.prod(self.input_shape), name="decoder_out")

    @property
    def code_size(self) -> int:
        return self.num_latents * self.code_dim

    def quantized(self, x: Array) -> tuple[Array, quantize.Quantized]:
        """The encoder outputs ``(B, num_latents, code_dim)`` and their :class:`Quantized`."""
        check_input(x, self.input_shape, "VQVAE")
        h = _mlp_encoder_body(self, x, self.enc)
        encoding = self.enc_out(h).reshape(x.shape[0], self.num_latents, self.code_dim)
        return encoding, self.quantizer(encoding)

    def encode(self, x: Array) -> Array:
        """The quantized codes ``(B, num_latents * code_dim)`` (straight-through gradients)."""
        return self.quantized(x)[1].code.reshape(x.shape[0], -1)

    def decode(self, z: Array) -> Array:
        """Logits ``(B, *input_shape)`` from quantized codes ``(B, num_latents * code_dim)``."""
        return _mlp_decoder(self, z, self.code_size, "codes")

    def __call__(self, x: Array) -> tuple[Array, dict[str, Array]]:
        """``(logits, aux)`` with ``code``, ``encoding``, ``codeword`` and ``code_counts``."""
        encoding, q = self.quantized(x)
        flat = lambda a: a.reshape(x.shape[0], -1)
        code = flat(q.code)
        self.sow("intermediates", "code", code)
        return self.decode(code), {"code": code, "encoding": flat(encoding),
                                   "codeword": flat(q.codeword),
                                   "code_counts": quantize.code_counts(q.indices, self.num_codes)}


MODELS: dict[str, type[nn.Module]] = {
    "mlp": MLPAutoencoder,
    "conv": ConvAutoencoder,
    "vae": VAE,
    "cvae": CVAE,
    "vqvae": VQVAE,
}


def register(name: str, cls: type[nn.Module]) -> None:
    """Adds ``cls`` (a module following the protocol above) under ``name`` for :func:`create`,
    and so for configs (``model.name``), the command line, figures, probes and the PCA comparison."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register: {cls!r} is not a flax.linen Module class.")
    if name in MODELS and MODELS[name] is not cls:
        raise ValueError(f"A model named {name!r} is registered already ({MODELS[name].__name__}).")
    MODELS[name] = cls


def _lookup(name: str) -> type[nn.Module]:
    if name in MODELS:
        return MODELS[name]
    if ":" in name:  # "package.module:Class", importable from the working directory
        module_name, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"Cannot import model {name!r} ({e}); give 'module:Class' with the "
                             "module importable from the working directory.") from None
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ValueError(f"Model {name!r} is not a flax.linen Module class.")
        return cls
    raise ValueError(f"Unknown model {name!r}; choose one of {sorted(MODELS)}, register one with "
                     "aejax.models.register(name, cls), or give 'module:Class'.")


def create(name: str, **kwargs: Any) -> nn.Module:
    """The model called ``name`` (registered, or ``"module:Class"``) built with ``kwargs``.

    Clear errors for unknown names or options; lists become tuples (configs hold lists).
    """
    cls = _lookup(name)
    fields = set(cls.__dataclass_fields__) - {"parent", "name"}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"Model {name!r} has no option(s) {unknown}; its options are {sorted(fields)}.")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return cls(**kwargs)


def from_config(model_config: Any) -> nn.Module:
    """The model a config's ``model`` section describes: ``name`` plus constructor options."""
    options = dict(model_config)
    return create(options.pop("name"), **options)


# --------------------------------------------------------------------------- the protocol's users



def conditional(model: nn.Module) -> bool:
    """Whether ``model`` takes the examples' labels as a second argument (``conditional = True``)."""
    return bool(getattr(model, "conditional", False))


def call_args(model: nn.Module, first: Array, condition: Optional[Array], fn: str) -> tuple:
    """The arguments of a call of ``model`` (or one of its methods) on ``first``: ``(first,)``, or
    for a conditional model ``(first, condition)``, with a clear error naming ``fn`` without it."""
    if not conditional(model):
        return (first,)
    if condition is None:
        raise ValueError(f"{fn}: {type(model).__name__} is a conditional model; pass the examples' "
                         "labels (condition=y; in a batch, batch['y']).")
    return (first, jnp.asarray(condition))


def stand_in_condition(model: nn.Module, example: Array) -> Optional[Array]:
    """Labels to stand in for ``example``'s (zeros) where shapes alone matter; None if unconditional."""
    return jnp.zeros(example.shape[:1], jnp.int32) if conditional(model) else None


def init(model: nn.Module, rng: Array, example: Array) -> dict:
    """Initial ``params`` of ``model`` for inputs shaped like ``example`` (one batch)."""
    args = call_args(model, example, stand_in_condition(model, example), "init")
    return model.init({"params": rng, SAMPLE_RNG: jax.random.PRNGKey(0)}, *args)["params"]


def forward(model: nn.Module, params: Any, x: Array, rng: Array, condition: Optional[Array] = None
            ) -> tuple[Array, dict[str, Array], dict[str, Array]]:
    """``(logits, aux, activations)``: one call of ``model`` with its sown activations by name.

    ``rng`` feeds the :data:`SAMPLE_RNG` stream; ``condition`` holds the labels of a conditional
    model. ``activations`` always has ``"code"``.
    """
    (logits, aux), state = model.apply({"params": params}, *call_args(model, x, condition, "forward"),
                                       rngs={SAMPLE_RNG: rng}, mutable=["intermediates"])
    if not isinstance(aux, dict) or "code" not in aux:
        raise TypeError(f"{type(model).__name__} does not follow the aejax model protocol: its call "
                        "must return (logits, aux) with aux['code'] (see aejax.models).")
    activations = {k: v[0] for k, v in state.get("intermediates", {}).items()}
    activations.setdefault("code", aux["code"])
    return logits, aux, activations


def encoder(model: nn.Module, params: Any, condition: Optional[Array] = None
            ) -> Callable[[Array], Array]:
    """The deterministic encoder ``x -> code`` at ``params`` (given the labels ``condition`` of a
    conditional model: then ``x`` must hold the same examples, in the same order)."""
    return lambda x: model.apply({"params": params}, *call_args(model, x, condition, "encoder"),
                                 method="encode")


def decoder(model: nn.Module, params: Any, condition: Optional[Array] = None
            ) -> Callable[[Array], Array]:
    """The decoder ``code -> logits`` at ``params`` (given the labels of a conditional model)."""
    return lambda z: model.apply({"params": params}, *call_args(model, z, condition, "decoder"),
                                 method="decode")


def first_layer_kernel(model: nn.Module, params: Any) -> Array:
    """The encoder's first kernel: a dense first layer's ``(D, K)`` (from ``dense_layers()``), or
    what the model's own ``first_layer_kernel()`` returns (a convolution's filters)."""
    layers = dense_encoder(model, params)
    if layers is not None:
        return layers[0].kernel
    if callable(getattr(model, "first_layer_kernel", None)):
        return model.apply({"params": params}, method="first_layer_kernel")
    raise ValueError(f"{type(model).__name__} offers neither dense_layers() nor "
                     "first_layer_kernel().")


def stack_mlp_params(stage_params: Sequence[Any]) -> dict:
    """Parameters of a deep untied :class:`MLPAutoencoder` from those of its one-hidden-layer
    stages (greedy layer-wise training): stage ``i`` gives encoder layer ``i`` and the decoder
    layer that mirrors it."""
    n = len(stage_params)
    params = {}
    for i, p in enumerate(stage_params):
        params[f"encoder_{i}"] = p["encoder_0"]
        params[f"decoder_{n - 1 - i}"] = p["decoder_0"]
    return params


def dense_encoder(model: nn.Module, params: Any) -> Optional[tuple[DenseLayer, ...]]:
    """The encoder's dense layers where the model offers them (``dense_layers()``), else None."""
    if not callable(getattr(model, "dense_layers", None)):
        return None
    return tuple(model.apply({"params": params}, method="dense_layers"))


class Description(NamedTuple):
    """What the run needs to know of a model, found without running it.

    Attributes:
      code_size: width ``H`` of ``aux["code"]``.
      stochastic: whether the model returns a posterior (``aux["mean"]``, ``aux["logvar"]``).
      aux: the names in ``aux``.
      conditional: whether the model takes labels (:func:`conditional`).
    """

    code_size: int
    stochastic: bool
    aux: tuple[str, ...]
    conditional: bool = False


def describe(model: nn.Module, params: Any, example: Array) -> Description:
    """:class:`Description` of ``model`` on inputs shaped like ``example`` (``jax.eval_shape``)."""
    condition = stand_in_condition(model, example)
    _, aux, _ = jax.eval_shape(lambda p, x, c: forward(model, p, x, jax.random.PRNGKey(0), c),
                               params, example, condition)
    code = aux["code"]
    return Description(code_size=math.prod(code.shape[1:]),
                       stochastic="mean" in aux and "logvar" in aux, aux=tuple(sorted(aux)),
                       conditional=conditional(model))


def reconstruct_logits(model: nn.Module, params: Any, x: Array,
                       condition: Optional[Array] = None) -> Array:
    """Deterministic reconstructions' logits: a stochastic model decodes its posterior mean."""
    logits, aux, _ = forward(model, params, x, jax.random.PRNGKey(0), condition)
    if "mean" in aux:
        logits = decoder(model, params, condition)(aux["mean"])
    return logits


@functools.partial(jax.jit, static_argnames="model")
def _encode_jit(params, x, condition, *, model: nn.Module):
    return encoder(model, params, condition)(x)


def encode_batched(model: nn.Module, params: Any, x, *, batch_size: int = 2000,
                   condition=None) -> Array:
    """Codes ``(N, H)`` of a whole array ``x``, ``batch_size`` rows at a time (given the labels
    ``condition`` ``(N,)`` of a conditional model).

    One compiled encoder per model, batch shape and dtype (the model is a static argument, so
    repeated calls compile nothing new); the last, shorter batch compiles once more.
    """
    if batch_size <= 0:
        raise ValueError(f"encode_batched: batch_size must be positive, got {batch_size}.")
    call_args(model, x, condition, "encode_batched")
    part = lambda i: None if condition is None else jnp.asarray(condition[i:i + batch_size])
    return jnp.concatenate([_encode_jit(params, jnp.asarray(x[i:i + batch_size]), part(i),
                                        model=model)
                            for i in range(0, len(x), batch_size)])
