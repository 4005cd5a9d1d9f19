"""Stride-1 convolutions with few input channels as shifted slices and one matrix product.

XLA's CPU convolution is slow when a layer has one or a few input channels, as the first layer of
an image autoencoder does (28 x 28 x 1 in, 16 features out). There a ``k x k`` convolution is
cheaper *patches first*: the ``k * k`` shifted views of the padded input side by side,
``(B, H', W', k*k*C_in)``, times the kernel as a ``(k*k*C_in, C_out)`` matrix. The gradients are
the same slices, pads and products, which autodiff derives. The value is the convolution's, up to
float rounding (the sums run in another order).

:func:`conv_general_dilated` has ``jax.lax.conv_general_dilated``'s signature, so it plugs into
``flax.linen.Conv(..., conv_general_dilated=...)`` without changing the module's parameters; it
takes this path only for a stride-1, undilated, ungrouped NHWC/HWIO convolution with at most
:data:`FEW_CHANNELS` input channels, and calls ``lax.conv_general_dilated`` otherwise. (The
mirror image, few *output* channels as products first and shifted sums, measured slower than
XLA's convolution in the conv autoencoder's gradient, so it is not offered.)
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

FEW_CHANNELS = 4
LOWERINGS = ("auto", "xla", "shifted")

_NHWC = ("NHWC", "HWIO", "NHWC")


def _applies(lhs, rhs, window_strides, lhs_dilation, rhs_dilation, dimension_numbers,
             feature_group_count) -> bool:
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
    return rhs.shape[2] <= FEW_CHANNELS


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
    _, h, w, c_in = x.shape
    kh, kw, _, c_out = kernel.shape
    if isinstance(padding, str):
        pads = lax.padtype_to_pads((h, w), (kh, kw), (1, 1), padding)
    else:
        pads = [tuple(p) for p in padding]
    ho = h + pads[0][0] + pads[0][1] - kh + 1
    wo = w + pads[1][0] + pads[1][1] - kw + 1
    xp = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
    patches = jnp.concatenate([xp[:, i:i + ho, j:j + wo, :] for i in range(kh) for j in range(kw)],
                              axis=-1)
    return jnp.dot(patches, kernel.reshape(kh * kw * c_in, c_out), precision=precision)


def conv_general_dilated(lhs: Array, rhs: Array, window_strides: Sequence[int], padding,
                         lhs_dilation: Optional[Sequence[int]] = None,
                         rhs_dilation: Optional[Sequence[int]] = None,
                         dimension_numbers=None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision=None,
                         preferred_element_type=None) -> Array:
    """``lax.conv_general_dilated``, by :func:`shifted_conv` where the input has few channels.

    For ``flax.linen.Conv(..., conv_general_dilated=conv_general_dilated)``.
    """
    if (batch_group_count == 1 and preferred_element_type is None
            and _applies(lhs, rhs, window_strides, lhs_dilation, rhs_dilation,
                         dimension_numbers, feature_group_count)):
        return shifted_conv(lhs, rhs, padding, precision)
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)


def for_lowering(lowering: str):
    """The ``conv_general_dilated`` for ``flax.linen.Conv`` that ``lowering`` names.

    ``"xla"``: ``lax.conv_general_dilated`` always. ``"shifted"``: :func:`conv_general_dilated`
    (shifted slices where the input has few channels). ``"auto"``: shifted on a CPU backend, where
    it is faster, XLA's convolution elsewhere (GPU and TPU convolution libraries handle few
    channels well).
    """
    if lowering not in LOWERINGS:
        raise ValueError(f"Unknown convolution lowering {lowering!r}; choose one of {LOWERINGS}.")
    if lowering == "auto":
        lowering = "shifted" if jax.default_backend() == "cpu" else "xla"
    return conv_general_dilated if lowering == "shifted" else lax.conv_general_dilated
