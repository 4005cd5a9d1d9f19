"""Stride-1 convolutions with few input or few output channels, in the forms XLA's CPU runs fast.

XLA's CPU convolution is slow when a layer has one or a few input channels, as the first layer of
an image autoencoder does (28 x 28 x 1 in, 16 features out). There a ``k x k`` convolution is
cheaper *patches first*: the ``k * k`` shifted views of the padded input side by side,
``(B, H', W', k*k*C_in)``, times the kernel as a ``(k*k*C_in, C_out)`` matrix. The gradients are
the same slices, pads and products, which autodiff derives. The value is the convolution's, up to
float rounding (the sums run in another order).

The mirror case, few *output* channels (the last layer of a decoder: 16 features to one image
channel), is cheaper *products first*: one product gives every tap's contribution, ``(B, H, W,
k*k*C_out)``, and the output is the sum of their shifted views. :func:`few_outputs_conv` computes
the value so; it defines its tangent in the kernel so that reverse mode transposes it into the
``k * k`` shifted views of the (few-channel) output gradient and one product with the input (XLA's
CPU computes that kernel gradient slowly), and keeps XLA's convolution for the input gradient.

:func:`conv_general_dilated` has ``jax.lax.conv_general_dilated``'s signature, so it plugs into
``flax.linen.Conv(..., conv_general_dilated=...)`` without changing the module's parameters; it
takes these paths only for a stride-1, undilated, ungrouped NHWC/HWIO convolution with at most
:data:`FEW_CHANNELS` input channels (or :data:`FEW_OUTPUT_CHANNELS` output channels), and calls
``lax.conv_general_dilated`` otherwise.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

FEW_CHANNELS = 4
# The output-gradient path pays for its k * k shifted views with as many padded copies: it
# measured clearly faster than XLA's kernel gradient at one output channel, little at two, and
# slower from four on.
FEW_OUTPUT_CHANNELS = 1
LOWERINGS = ("auto", "xla", "shifted")

_NHWC = ("NHWC", "HWIO", "NHWC")


def _stride1_nhwc(lhs, rhs, window_strides, lhs_dilation, rhs_dilation, dimension_numbers,
                  feature_group_count) -> bool:
    """Whether the call is a stride-1, undilated, ungrouped NHWC/HWIO convolution."""
    if getattr(lhs, "ndim", None) != 4 or getattr(rhs, "ndim", None) != 4:
        return False
    if tuple(window_strides) != (1, 1) or feature_group_count != 1:
        return False
    if any(d is not None and tuple(d) != (1, 1) for d in (lhs_dilation, rhs_dilation)):
        return False
    want = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    if dimension_numbers is None or lax.conv_dimension_numbers(
            lhs.shape, rhs.shape, dimension_numbers) != want:
        return False
    return True


def _pads(x_hw, kernel_hw, padding) -> tuple[tuple[int, int], ...]:
    if isinstance(padding, str):
        return tuple(lax.padtype_to_pads(x_hw, kernel_hw, (1, 1), padding))
    return tuple(tuple(p) for p in padding)


def _output_hw(x_hw, kernel_hw, pads) -> tuple[int, int]:
    """A stride-1 convolution's output size ``(H', W')``."""
    return tuple(n + lo + hi - k + 1 for n, k, (lo, hi) in zip(x_hw, kernel_hw, pads))


def shifted_conv(x: Array, kernel: Array, padding, precision=None) -> Array:
    """A stride-1 NHWC convolution with an HWIO kernel, as shifted slices and one product
    (cheap where ``C_in`` is small: the patches have ``k * k * C_in`` channels).

    Args:
      x: inputs ``(B, H, W, C_in)``.
      kernel: ``(kh, kw, C_in, C_out)``.
      padding: ``"SAME"``, ``"VALID"`` or ``((top, bottom), (left, right))``, as ``lax`` takes it.
      precision: passed to the matrix product.

    Returns:
      ``(B, H', W', C_out)``, equal to ``lax.conv_general_dilated(x, kernel, (1, 1), padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"))`` up to float rounding.

    >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    >>> k = jnp.ones((3, 3, 1, 1))
    >>> shifted_conv(x, k, "VALID")[0, :, :, 0].tolist()
    [[45.0, 54.0], [81.0, 90.0]]
    """
    kh, kw, c_in, c_out = kernel.shape
    pads = _pads(x.shape[1:3], (kh, kw), padding)
    ho, wo = _output_hw(x.shape[1:3], (kh, kw), pads)
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    patches = jnp.concatenate([xp[:, i:i + ho, j:j + wo, :] for i in range(kh) for j in range(kw)],
                              axis=-1)
    return jnp.dot(patches, kernel.reshape(kh * kw * c_in, c_out), precision=precision)


def _xla_conv(x: Array, kernel: Array, pads, precision) -> Array:
    return lax.conv_general_dilated(x, kernel, (1, 1), pads, dimension_numbers=_NHWC,
                                    precision=precision)


def _tap_products(x: Array, kernel: Array, pads, precision) -> tuple[Array, int, int]:
    """Every tap's product ``x @ kernel[i, j]`` in one product, ``(B, H, W, k*k, C_out)``, and
    the convolution's output size ``(H', W')``."""
    kh, kw, c_in, c_out = kernel.shape
    q = jnp.einsum("bhwc,tco->bhwto", x, kernel.reshape(kh * kw, c_in, c_out),
                   precision=precision)
    return (q, *_output_hw(x.shape[1:3], (kh, kw), pads))


def _products_first(x: Array, kernel: Array, pads, precision) -> Array:
    """The convolution as the taps' products (:func:`_tap_products`), then their shifted views
    summed: cheap where ``C_out`` is small."""
    kh, kw = kernel.shape[:2]
    q, ho, wo = _tap_products(x, kernel, pads, precision)
    (top, bottom), (left, right) = pads
    q = jnp.pad(q, ((0, 0), (top, bottom), (left, right), (0, 0), (0, 0)))
    return sum(q[:, i:i + ho, j:j + wo, i * kw + j, :] for i in range(kh) for j in range(kw))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _few_outputs(x: Array, kernel: Array, pads, precision) -> Array:
    return _products_first(x, kernel, pads, precision)


def _kernel_tangent(x: Array, d_kernel: Array, pads, precision) -> Array:
    """``conv(x, d_kernel)``, written as the transpose of the kernel gradient wanted.

    Each tap's product ``x @ d_kernel[i, j]`` is padded into place in a frame of the input's
    size plus ``k - 1`` and the taps summed; the output window is then cropped from the frame.
    Reverse mode transposes that into: pad the output gradient once, take its ``k * k``
    shifted views (few channels each), and contract them with ``x`` in one product.
    """
    kh, kw, _, c_out = d_kernel.shape
    (top, _), (left, _) = pads
    q, ho, wo = _tap_products(x, d_kernel, pads, precision)
    frame = 0
    for i in range(kh):
        for j in range(kw):
            frame = frame + jnp.pad(q[:, :, :, i * kw + j, :],
                                    ((0, 0), (kh - 1 - i, i), (kw - 1 - j, j), (0, 0)))
    # frame[r, s] = sum over taps of q_ij[r - (kh-1-i), s - (kw-1-j)]; output (r', s') reads
    # x at r' + i - top, so it sits at frame row r' + kh - 1 - top.
    return lax.slice(frame, (0, kh - 1 - top, kw - 1 - left, 0),
                     (frame.shape[0], kh - 1 - top + ho, kw - 1 - left + wo, c_out))


@_few_outputs.defjvp
def _few_outputs_jvp(pads, precision, primals, tangents):
    (x, kernel), (dx, d_kernel) = primals, tangents
    # A zero tangent (an input that needs no gradient) arrives as zeros; its convolution is dead
    # code in reverse mode and leaves the program (tests/test_convolution.py checks that the
    # kernel gradient's program holds no convolution).
    return (_few_outputs(x, kernel, pads, precision),
            _xla_conv(dx, kernel, pads, precision) + _kernel_tangent(x, d_kernel, pads, precision))


def few_outputs_conv(x: Array, kernel: Array, padding, precision=None) -> Array:
    """A stride-1 NHWC convolution with an HWIO kernel, products first, whose kernel gradient is
    the output gradient's shifted views times the input (cheap where ``C_out`` is small).

    The value and the kernel's gradient equal XLA's convolution's up to float rounding (the sums
    run in another order); the input's gradient is XLA's. Forward mode works too (the tangent is
    a convolution of the tangents).

    Args:
      x: inputs ``(B, H, W, C_in)``.
      kernel: ``(kh, kw, C_in, C_out)``.
      padding: ``"SAME"``, ``"VALID"`` or ``((top, bottom), (left, right))``.
      precision: passed to the convolution and the products.
    """
    return _few_outputs(x, kernel, _pads(x.shape[1:3], kernel.shape[:2], padding), precision)


def conv_general_dilated(lhs: Array, rhs: Array, window_strides: Sequence[int], padding,
                         lhs_dilation: Optional[Sequence[int]] = None,
                         rhs_dilation: Optional[Sequence[int]] = None,
                         dimension_numbers=None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision=None,
                         preferred_element_type=None) -> Array:
    """``lax.conv_general_dilated``, by :func:`shifted_conv` where the input has few channels and
    by :func:`few_outputs_conv` where the output has few.

    For ``flax.linen.Conv(..., conv_general_dilated=conv_general_dilated)``.
    """
    if (batch_group_count == 1 and preferred_element_type is None
            and _stride1_nhwc(lhs, rhs, window_strides, lhs_dilation, rhs_dilation,
                              dimension_numbers, feature_group_count)):
        if rhs.shape[2] <= FEW_CHANNELS:
            return shifted_conv(lhs, rhs, padding, precision)
        if rhs.shape[3] <= FEW_OUTPUT_CHANNELS:
            return few_outputs_conv(lhs, rhs, padding, precision)
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)


def for_lowering(lowering: str):
    """The ``conv_general_dilated`` for ``flax.linen.Conv`` that ``lowering`` names.

    ``"xla"``: ``lax.conv_general_dilated`` always. ``"shifted"``: :func:`conv_general_dilated`
    (shifted slices where the input has few channels, products first where the output has few).
    ``"auto"``: shifted on a CPU backend, where it is faster, XLA's convolution elsewhere (GPU
    and TPU convolution libraries handle few channels well).
    """
    if lowering not in LOWERINGS:
        raise ValueError(f"Unknown convolution lowering {lowering!r}; choose one of {LOWERINGS}.")
    if lowering == "auto":
        lowering = "shifted" if jax.default_backend() == "cpu" else "xla"
    return conv_general_dilated if lowering == "shifted" else lax.conv_general_dilated
