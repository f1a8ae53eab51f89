"""torch-layout 1-D convolutions on channels-last activations, float32.

Weights stay in torch's layout (``Conv1d``: ``[out, in, k]``; ``ConvTranspose1d``: ``[in, out, k]``;
``lax.conv_general_dilated`` takes the layout as a dimension-number string), so loading a checkpoint
is a plain copy. Activations are ``[B, T, C]``. Shared by the speaker encoder and BigVGAN.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

_F32 = jnp.float32


def _uniform(rngs: nnx.Rngs, shape, fan_in):
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    return jax.random.uniform(rngs.params(), shape, _F32, -bound, bound)


class Conv1d(nnx.Module):
    """torch ``Conv1d``: ``weight [out, in, k]``, optional ``bias [out]``, on ``x [B, T, in]``.

    ``padding`` is an int (both sides) or ``"same"`` (torch's split: left = total // 2);
    ``padding_mode`` is ``"zeros"`` or ``"reflect"``.
    """

    def __init__(self, cin, cout, k, *, dilation=1, padding=0, padding_mode="zeros", bias=True, rngs):
        self.weight = nnx.Param(_uniform(rngs, (cout, cin, k), cin * k))
        self.bias = nnx.Param(_uniform(rngs, (cout,), cin * k)) if bias else None
        self.dilation = dilation
        self.padding = padding
        self.padding_mode = padding_mode

    def __call__(self, x):
        w = self.weight[...]
        k = w.shape[-1]
        if self.padding == "same":
            total = self.dilation * (k - 1)
            left, right = total // 2, total - total // 2
        else:
            left = right = int(self.padding)
        if self.padding_mode == "reflect" and (left or right):
            x = jnp.pad(x, ((0, 0), (left, right), (0, 0)), mode="reflect")
            left = right = 0
        y = jax.lax.conv_general_dilated(
            x, w, window_strides=(1,), padding=[(left, right)], rhs_dilation=(self.dilation,),
            dimension_numbers=("NWC", "OIW", "NWC"), preferred_element_type=_F32)
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class ConvTranspose1d(nnx.Module):
    """torch ``ConvTranspose1d``: ``weight [in, out, k]``, ``bias [out]``, stride and padding."""

    def __init__(self, cin, cout, k, stride, padding, *, rngs):
        self.weight = nnx.Param(_uniform(rngs, (cin, cout, k), cout * k))
        self.bias = nnx.Param(_uniform(rngs, (cout,), cout * k))
        self.stride = stride
        self.padding = padding

    def __call__(self, x):
        # Polyphase form: output phase r of z[s*m + r] = sum_q x[m - q] W[:, :, s*q + r] is a plain
        # stride-1 convolution with ceil(k/s) taps, so all s phases are one convolution with
        # s * out channels, interleaved by a reshape. (A stride-dilated input would multiply
        # s - 1 inserted zeros per sample.) Then crop ``padding`` on each side, as torch does.
        w = self.weight[...]
        cin, cout, k = w.shape
        s, p = self.stride, self.padding
        b, n, _ = x.shape
        kk = -(-k // s)
        w = jnp.pad(w, ((0, 0), (0, 0), (0, kk * s - k))).reshape(cin, cout, kk, s)
        w = jnp.flip(w, 2).transpose(2, 0, 3, 1).reshape(kk, cin, s * cout)  # [taps, in, (phase, out)]
        z = jax.lax.conv_general_dilated(
            x, w, window_strides=(1,), padding=[(kk - 1, kk - 1)], dimension_numbers=("NWC", "WIO", "NWC"),
            preferred_element_type=_F32)
        z = z.reshape(b, (n + kk - 1) * s, cout)
        return z[:, p:p + (n - 1) * s + k - 2 * p] + self.bias[...]
