"""The bench's steps in eager PyTorch: the same models, losses, optimizer (Adam) and batches.

Each model mirrors an aejax model layer for layer, with the aejax parameter names, and
:func:`load_flax` copies an aejax model's parameters into it, so the two compute the same loss on
the same weights and batch (``tests/test_peers.py`` checks it). :class:`Runner` takes Adam steps
on a training set as aejax's loop does, for ``experiments.bench`` to time side by side.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": torch.relu, "sigmoid": torch.sigmoid, "linear": lambda h: h}


def jax_cpu_threads() -> int:
    """The threads of XLA's CPU backend: one per CPU this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class MLP(nn.Module):
    """:class:`aejax.models.MLPAutoencoder` (untied): ``dims[0] - ... - dims[-1] - ... - dims[0]``.

    ``activation`` after every layer but the code layer (``code_activation``) and the last.
    """

    def __init__(self, dims: Sequence[int], activation: str = "relu",
                 code_activation: str = "linear"):
        super().__init__()
        self.act, self.code_act = ACTIVATIONS[activation], ACTIVATIONS[code_activation]
        back = tuple(reversed(dims))
        self.num_layers = len(dims) - 1
        self.layers = nn.ModuleDict(
            {f"encoder_{i}": nn.Linear(a, b) for i, (a, b) in enumerate(zip(dims, dims[1:]))}
            | {f"decoder_{i}": nn.Linear(a, b) for i, (a, b) in enumerate(zip(back, back[1:]))})

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            h = (self.code_act if last else self.act)(self.layers[f"encoder_{i}"](h))
        return h

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = z
        for i in range(self.num_layers):
            h = self.layers[f"decoder_{i}"](h)
            if i < self.num_layers - 1:
                h = self.act(h)
        return h

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        code = self.encode(x)
        return self.decode(code), {"code": code}


class Conv(nn.Module):
    """:class:`aejax.models.ConvAutoencoder` on NCHW images ``(B, 1, 28, 28)``.

    Encoder Conv16-Pool-Conv8-Pool-Conv8-Pool, 3x3 convolutions. aejax pools 2x2 with SAME
    padding at the bottom and right (7 -> 4), which is ``ceil_mode=True`` here. Decoder for
    ``upsampling="nearest"``: Conv8-Up-Conv8-Up-Conv16(valid)-Up-Conv1, nearest-neighbour 2x
    upsampling; for ``"unpool"``: Conv8-Unpool-Conv8-Unpool-Conv16-Unpool-Conv1, each unpooling
    at the switches of the matching pooling (``MaxPool2d(return_indices=True)``, ``MaxUnpool2d``;
    both keep the first maximum of a window, as aejax's switches do).
    """

    def __init__(self, features: Sequence[int] = (16, 8, 8), activation: str = "relu",
                 upsampling: str = "nearest"):
        super().__init__()
        if upsampling not in ("nearest", "unpool"):
            raise ValueError(f"Conv mirrors upsampling 'nearest' and 'unpool', not {upsampling!r}.")
        f1, f2, f3 = features
        conv = lambda a, b, padding=1: nn.Conv2d(a, b, 3, padding=padding)
        last_padding = 0 if upsampling == "nearest" else 1  # the nearest decoder's valid conv
        self.layers = nn.ModuleDict(dict(
            encoder_0=conv(1, f1), encoder_1=conv(f1, f2), encoder_2=conv(f2, f3),
            decoder_0=conv(f3, f3), decoder_1=conv(f3, f2), decoder_2=conv(f2, f1, last_padding),
            decoder_out=conv(f1, 1)))
        self.act, self.upsampling = ACTIVATIONS[activation], upsampling
        self.pool = nn.MaxPool2d(2, ceil_mode=True, return_indices=upsampling == "unpool")
        self.unpool = nn.MaxUnpool2d(2)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The code, flattened (in NCHW order: the same values as aejax's, in another order)."""
        h = x
        for i in range(3):
            h = self.pool(self.act(self.layers[f"encoder_{i}"](h)))
            h = h[0] if self.upsampling == "unpool" else h
        return h.flatten(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        h, switches, sizes = x, [], []
        for i in range(3):
            h = self.act(self.layers[f"encoder_{i}"](h))
            sizes.append(h.shape[-2:])
            if self.upsampling == "unpool":
                h, s = self.pool(h)
                switches.append(s)
            else:
                h = self.pool(h)
        code = h.flatten(1)
        for i in range(3):
            h = self.act(self.layers[f"decoder_{i}"](h))
            if self.upsampling == "unpool":
                h = self.unpool(h, switches[2 - i], output_size=sizes[2 - i])
            else:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
        return self.layers["decoder_out"](h), {"code": code}


class VAE(nn.Module):
    """:class:`aejax.models.VAE` (Bernoulli): a diagonal Gaussian encoder and an MLP decoder.

    ``forward(x, noise)`` draws ``z = mean + exp(logvar / 2) * noise``, with fresh standard
    normal noise when ``noise`` is None.
    """

    def __init__(self, input_size: int = 784, hidden: Sequence[int] = (512,),
                 latent_size: int = 2, activation: str = "relu"):
        super().__init__()
        widths = (input_size, *hidden)
        back = (latent_size, *reversed(hidden))
        self.act, self.depth = ACTIVATIONS[activation], len(hidden)
        self.layers = nn.ModuleDict(
            {f"encoder_{i}": nn.Linear(a, b) for i, (a, b) in enumerate(zip(widths, widths[1:]))}
            | {"encoder_mean": nn.Linear(widths[-1], latent_size),
               "encoder_logvar": nn.Linear(widths[-1], latent_size)}
            | {f"decoder_{i}": nn.Linear(a, b) for i, (a, b) in enumerate(zip(back, back[1:]))}
            | {"decoder_out": nn.Linear(back[-1], input_size)})

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x.flatten(1)
        for i in range(self.depth):
            h = self.act(self.layers[f"encoder_{i}"](h))
        return self.layers["encoder_mean"](h), self.layers["encoder_logvar"](h)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.posterior(x)[0]

    def forward(self, x: torch.Tensor, noise: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, dict]:
        mean, logvar = self.posterior(x)
        noise = torch.randn_like(mean) if noise is None else noise
        z = mean + torch.exp(0.5 * logvar) * noise
        h = z
        for i in range(self.depth):
            h = self.act(self.layers[f"decoder_{i}"](h))
        return self.layers["decoder_out"](h), {"code": z, "mean": mean, "logvar": logvar}


def mirror(model: Any) -> nn.Module:
    """The PyTorch twin of an aejax model (``MLPAutoencoder`` untied, ``ConvAutoencoder``, ``VAE``
    with a Bernoulli likelihood), with PyTorch's own initial weights: :func:`load_flax` gives it
    the aejax model's."""
    kind = type(model).__name__
    if kind == "MLPAutoencoder" and not model.tied:
        dims = (int(np.prod(model.input_shape)), *model.hidden, model.code_size)
        return MLP(dims, model.activation, model.code_activation)
    if kind == "ConvAutoencoder":
        return Conv(model.features, model.activation, model.upsampling)
    if kind == "VAE" and model.likelihood == "bernoulli":
        return VAE(int(np.prod(model.input_shape)), model.hidden, model.latent_size,
                   model.activation)
    raise ValueError(f"No PyTorch twin of {model!r}.")


def load_flax(module: nn.Module, params: Mapping[str, Mapping[str, Any]]) -> nn.Module:
    """Copies an aejax model's parameters (``{layer: {"kernel", "bias"}}``) into its twin.

    A dense kernel ``(in, out)`` is ``Linear.weight`` transposed; a convolution's kernel
    ``(kh, kw, in, out)`` (HWIO) is ``Conv2d.weight`` ``(out, in, kh, kw)``. Every layer of the
    twin must be in ``params`` and every layer of ``params`` in the twin.
    """
    layers = module.layers
    if set(layers) != set(params):
        raise ValueError(f"Layers differ: the PyTorch model has {sorted(layers)}, the parameters "
                         f"{sorted(params)}.")
    with torch.no_grad():
        for name, layer in layers.items():
            kernel = torch.from_numpy(np.array(params[name]["kernel"], np.float32))
            kernel = kernel.T if kernel.ndim == 2 else kernel.permute(3, 2, 0, 1)
            layer.weight.copy_(kernel)
            layer.bias.copy_(torch.from_numpy(np.array(params[name]["bias"], np.float32)))
    return module


# --------------------------------------------------------------------------- the objective


def bce_with_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Bernoulli negative log-likelihood in nats, summed per example: ``(B,)``."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(1).sum(1)


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mean, exp(logvar)) || N(0, I))`` per example: ``(B,)``."""
    return 0.5 * (torch.exp(logvar) + mean.square() - 1.0 - logvar).sum(1)


def contractive(encode, x: torch.Tensor) -> torch.Tensor:
    """Exact squared Frobenius norm of each example's encoder Jacobian: ``(B,)``.

    ``torch.func.jacrev`` of the batch-summed encoder gives the Jacobian rows of every example at
    once (one backward pass per code unit, vectorized by ``torch.func.vmap``), which is exact
    because examples do not interact; aejax's ``mode="rev"`` computes it the same way. It is
    differentiable, so the penalty trains.
    """
    rows = torch.func.jacrev(lambda inputs: encode(inputs).sum(0))(x)  # (H, B, *input)
    return rows.square().flatten(2).sum(dim=(0, 2))


def loss(model: nn.Module, x: torch.Tensor, *, terms: Optional[Mapping[str, float]] = None,
         noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The batch mean of aejax's ``objectives.build("bce", terms)``: the BCE of the
    reconstruction, plus ``terms["kl"]`` times the VAE's KL and ``terms["contractive"]`` times
    the exact contractive penalty, where given. ``noise`` is the VAE's (drawn when None)."""
    terms = dict(terms or {})
    unknown = set(terms) - {"kl", "contractive"}
    if unknown:
        raise ValueError(f"No PyTorch version of the terms {sorted(unknown)}.")
    logits, aux = model(x, noise) if isinstance(model, VAE) else model(x)
    total = bce_with_logits(logits, x)
    if "kl" in terms:
        total = total + terms["kl"] * gaussian_kl(aux["mean"], aux["logvar"])
    if "contractive" in terms:
        total = total + terms["contractive"] * contractive(model.encode, x)
    return total.mean()


def adam(module: nn.Module, lr: float = 1e-3) -> torch.optim.Optimizer:
    """Adam as the bench's aejax steps use it (``optax.adam(lr, b1=0.9, b2=0.999)``, eps 1e-8)."""
    return torch.optim.Adam(module.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)


class Runner:
    """Adam steps on ``x_all``, ``steps_per_call`` per call, as aejax's loop takes them.

    Step ``n`` trains on batch ``n % (len(x_all) // batch_size)`` of the order ``perm``
    (dynamically binarized when ``binarize``, as aejax's ``binarize=True``), zeroes the
    gradients, computes :func:`loss`, back-propagates and updates. Unlike aejax's step it
    computes no metrics besides the loss (no squared error, no gradient norm). With ``threads``
    each call first sets PyTorch's intra-op threads (process-wide) to that number.
    """

    def __init__(self, model: nn.Module, x_all: np.ndarray, perm: np.ndarray, *,
                 batch_size: int, terms: Optional[Mapping[str, float]] = None,
                 binarize: bool = False, lr: float = 1e-3, steps_per_call: int = 1,
                 device: str = "cpu", threads: Optional[int] = None):
        self.device, self.threads = torch.device(device), threads
        self.model = model.to(self.device)
        self.x_all = torch.tensor(np.asarray(x_all, np.float32), device=self.device)
        self.perm = torch.tensor(np.asarray(perm, np.int64), device=self.device)
        self.batch_size, self.steps_per_call = batch_size, steps_per_call
        self.steps_per_epoch = len(x_all) // batch_size
        self.terms, self.binarize = dict(terms or {}), binarize
        self.optimizer = adam(self.model, lr)
        self.count = 0

    def step(self) -> torch.Tensor:
        start = (self.count % self.steps_per_epoch) * self.batch_size
        x = self.x_all[self.perm[start:start + self.batch_size]]
        if self.binarize:
            x = torch.bernoulli(x)
        self.optimizer.zero_grad(set_to_none=True)
        value = loss(self.model, x, terms=self.terms)
        value.backward()
        self.optimizer.step()
        self.count += 1
        return value

    def __call__(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        for _ in range(self.steps_per_call):
            self.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
