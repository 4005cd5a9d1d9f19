"""Autoencoder models as flax.linen modules: pure functions of their parameters.

Every model has ``encode`` (inputs to codes ``(B, H)``), ``decode`` (codes to logits shaped like
the inputs) and ``__call__``; hidden activations are sown into the ``intermediates`` collection
under their layer names so penalties can reach any layer without rewriting the model.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from aejax import pooling

Array = jax.Array

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

    def _act(self, i: int) -> Callable[[Array], Array]:
        last = i == len(self.hidden)
        return activation(self.code_activation if last else self.activation)

    def encode_first(self, x: Array) -> Array:
        """Pre-activations of the first layer, ``x @ W0 + b0``: ``(B, K)``."""
        check_input(x, self.input_shape, "MLPAutoencoder")
        return self.encoder_layers[0](x.reshape(x.shape[0], -1))

    def encode_head(self, pre: Array) -> Array:
        """The rest of the encoder after the first layer's pre-activations: ``(B, K) -> (B, H)``."""
        h = self._act(0)(pre)
        for i, layer in enumerate(self.encoder_layers[1:], start=1):
            self.sow("intermediates", f"hidden_{i - 1}", h)
            h = self._act(i)(layer(h))
        self.sow("intermediates", "code", h)
        return h

    def encode(self, x: Array) -> Array:
        """Codes ``(B, code_size)``."""
        return self.encode_head(self.encode_first(x))

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

    def __call__(self, x: Array) -> tuple[Array, Array]:
        """Returns ``(logits, code)``."""
        code = self.encode(x)
        return self.decode(code), code


class ConvAutoencoder(nn.Module):
    """The seeds' convolutional autoencoder on 28x28x1 images.

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
    """

    input_shape: Sequence[int] = (28, 28, 1)
    features: Sequence[int] = (16, 8, 8)
    activation: str = "relu"
    upsampling: str = "nearest"

    def setup(self):
        if tuple(self.input_shape) != (28, 28, 1):
            raise ValueError(f"ConvAutoencoder is built for (28, 28, 1) images, got input_shape="
                             f"{tuple(self.input_shape)}.")
        if self.upsampling not in ("nearest", "transpose", "unpool"):
            raise ValueError(f"ConvAutoencoder: unknown upsampling {self.upsampling!r}; choose "
                             "'nearest', 'transpose' or 'unpool'.")
        activation(self.activation)
        f1, f2, f3 = self.features
        self.enc = [nn.Conv(f, (3, 3), padding="SAME", name=f"encoder_{i}")
                    for i, f in enumerate((f1, f2, f3))]
        if self.upsampling == "nearest":
            self.dec = [nn.Conv(f3, (3, 3), padding="SAME", name="decoder_0"),
                        nn.Conv(f2, (3, 3), padding="SAME", name="decoder_1"),
                        nn.Conv(f1, (3, 3), padding="VALID", name="decoder_2")]
        elif self.upsampling == "unpool":
            self.dec = [nn.Conv(f, (3, 3), padding="SAME", name=f"decoder_{i}")
                        for i, f in enumerate((f3, f2, f1))]
        else:
            # 4 -> 8 -> 16 -> 14 (valid conv) -> 28, the same sizes as the nearest path.
            self.dec = [nn.ConvTranspose(f3, (2, 2), strides=(2, 2), name="decoder_0"),
                        nn.ConvTranspose(f2, (2, 2), strides=(2, 2), name="decoder_1"),
                        nn.Conv(f1, (3, 3), padding="VALID", name="decoder_2"),
                        nn.ConvTranspose(f1, (2, 2), strides=(2, 2), name="decoder_3")]
        self.out = nn.Conv(1, (3, 3), padding="SAME", name="decoder_out")

    @property
    def code_shape(self) -> tuple[int, int, int]:
        return (4, 4, self.features[2])

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
                h = act(conv(h))
                h = jax.image.resize(h, (h.shape[0], 2 * h.shape[1], 2 * h.shape[2], h.shape[3]),
                                     "nearest")
        else:
            for layer in self.dec:
                h = act(layer(h))
        return self.out(h)

    def __call__(self, x: Array) -> tuple[Array, Array]:
        code, switches = self.encode_with_switches(x)
        return self.decode(code, switches), code


class VAE(nn.Module):
    """Variational autoencoder with a diagonal Gaussian encoder and an MLP decoder.

    ``encode`` returns ``(mean, logvar)``; ``decode`` returns Bernoulli logits (or Gaussian
    means for ``likelihood='gaussian'``, with a learned global log standard deviation
    ``log_scale``). Sampling is the caller's, from an explicit key, so the module stays a pure
    function of its parameters.

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

    def encode(self, x: Array) -> tuple[Array, Array]:
        """``(mean, logvar)``, each ``(B, latent_size)``."""
        check_input(x, self.input_shape, "VAE")
        act = activation(self.activation)
        h = x.reshape(x.shape[0], -1)
        for i, layer in enumerate(self.enc):
            h = act(layer(h))
            self.sow("intermediates", f"hidden_{i}", h)
        return self.mean_layer(h), self.logvar_layer(h)

    def decode(self, z: Array) -> Array:
        """Logits (or means) shaped ``(B, *input_shape)``."""
        if z.ndim != 2 or z.shape[1] != self.latent_size:
            raise ValueError(f"VAE.decode: expected latents of shape (B, {self.latent_size}), got "
                             f"{tuple(z.shape)}.")
        act = activation(self.activation)
        h = z
        for layer in self.dec:
            h = act(layer(h))
        return self.out(h).reshape((z.shape[0], *self.input_shape))

    def decoder_log_scale(self) -> Array:
        """The Gaussian likelihood's log standard deviation (0 for Bernoulli models)."""
        return self.log_scale if self.likelihood == "gaussian" else jnp.zeros(())

    def __call__(self, x: Array, rng: Array) -> tuple[Array, Array, Array, Array]:
        """Returns ``(logits, z, mean, logvar)`` with ``z`` drawn by reparameterization from ``rng``."""
        mean, logvar = self.encode(x)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
        return self.decode(z), z, mean, logvar


MODELS: dict[str, type[nn.Module]] = {
    "mlp": MLPAutoencoder,
    "conv": ConvAutoencoder,
    "vae": VAE,
}


def create(name: str, **kwargs: Any) -> nn.Module:
    """The model called ``name`` built with ``kwargs``; clear errors for unknown names or fields."""
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; choose one of {sorted(MODELS)}.")
    cls = MODELS[name]
    fields = set(cls.__dataclass_fields__) - {"parent", "name"}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"Model {name!r} has no option(s) {unknown}; its options are {sorted(fields)}.")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return cls(**kwargs)


def init(model: nn.Module, rng: Array, example: Array) -> dict:
    """Initial ``params`` of ``model`` for inputs shaped like ``example`` (one batch)."""
    args = (example, jax.random.PRNGKey(0)) if isinstance(model, VAE) else (example,)
    return model.init(rng, *args)["params"]
