"""The DiT's speaker encoder: ECAPA-TDNN over the reference mel, ``[B, T, mel_dim] -> [B, enc_dim]``.

``Qwen2_5OmniToken2WavDiTModel.input_embed.spk_encoder`` in transformers: time-delay blocks with
reflect-padded "same" convolutions, squeeze-excitation Res2Net blocks, multi-layer feature
aggregation and attentive statistics pooling, float32. Convolution weights are in torch's layout
(:mod:`omni_jax.token2wav.conv`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import DiTConfig
from ..errors import CheckpointError
from .conv import Conv1d

_F32 = jnp.float32


class TimeDelayNetBlock(nnx.Module):
    def __init__(self, cin, cout, k, dilation, *, rngs):
        self.conv = Conv1d(cin, cout, k, dilation=dilation, padding="same", padding_mode="reflect", rngs=rngs)

    def __call__(self, x):
        return jax.nn.relu(self.conv(x))


class Res2NetBlock(nnx.Module):
    def __init__(self, cin, cout, scale, k, dilation, *, rngs):
        self.blocks = nnx.List([TimeDelayNetBlock(cin // scale, cout // scale, k, dilation, rngs=rngs)
                                for _ in range(scale - 1)])
        self.scale = scale

    def __call__(self, x):
        parts = jnp.split(x, self.scale, axis=-1)
        outs = [parts[0]]
        y = None
        for i in range(1, self.scale):
            y = self.blocks[i - 1](parts[i] if i == 1 else parts[i] + y)
            outs.append(y)
        return jnp.concatenate(outs, axis=-1)


class SqueezeExcitationBlock(nnx.Module):
    def __init__(self, cin, se, cout, *, rngs):
        self.conv1 = Conv1d(cin, se, 1, rngs=rngs)
        self.conv2 = Conv1d(se, cout, 1, rngs=rngs)

    def __call__(self, x):
        s = jnp.mean(x, axis=1, keepdims=True)
        s = jax.nn.sigmoid(self.conv2(jax.nn.relu(self.conv1(s))))
        return x * s


class SqueezeExcitationRes2NetBlock(nnx.Module):
    def __init__(self, cin, cout, scale, se, k, dilation, *, rngs):
        self.tdnn1 = TimeDelayNetBlock(cin, cout, 1, 1, rngs=rngs)
        self.res2net_block = Res2NetBlock(cout, cout, scale, k, dilation, rngs=rngs)
        self.tdnn2 = TimeDelayNetBlock(cout, cout, 1, 1, rngs=rngs)
        self.se_block = SqueezeExcitationBlock(cout, se, cout, rngs=rngs)

    def __call__(self, x):
        h = self.se_block(self.tdnn2(self.res2net_block(self.tdnn1(x))))
        return h + x


class AttentiveStatisticsPooling(nnx.Module):
    def __init__(self, channels, attention_channels, *, rngs):
        self.tdnn = TimeDelayNetBlock(channels * 3, attention_channels, 1, 1, rngs=rngs)
        self.conv = Conv1d(attention_channels, channels, 1, rngs=rngs)

    @staticmethod
    def _stats(x, w):
        mean = jnp.sum(w * x, axis=1)
        d = x - mean[:, None, :]
        std = jnp.sqrt(jnp.maximum(jnp.sum(w * d * d, axis=1), 1e-12))
        return mean, std

    def __call__(self, x):  # [B, T, C] -> [B, 2C]
        t = x.shape[1]
        mean, std = self._stats(x, jnp.asarray(1.0 / t, _F32))  # every frame valid: weight 1/T
        rep = lambda a: jnp.broadcast_to(a[:, None, :], x.shape)
        a = self.conv(jnp.tanh(self.tdnn(jnp.concatenate([x, rep(mean), rep(std)], axis=-1))))
        a = jax.nn.softmax(a, axis=1)
        mean, std = self._stats(x, a)
        return jnp.concatenate([mean, std], axis=-1)


class ECAPA_TimeDelayNet(nnx.Module):
    def __init__(self, cfg: DiTConfig, *, rngs):
        ch, ks, dl = cfg.enc_channels, cfg.enc_kernel_sizes, cfg.enc_dilations
        if not len(ch) == len(ks) == len(dl):
            raise CheckpointError("config.json: dit_config enc_channels, enc_kernel_sizes and enc_dilations "
                                  "must have the same length")
        if sum(ch[1:-1]) != ch[-1]:
            raise CheckpointError(f"config.json: dit_config enc_channels {list(ch)}: the last entry must be the "
                                  "sum of the middle ones (multi-layer feature aggregation)")
        blocks = [TimeDelayNetBlock(cfg.mel_dim, ch[0], ks[0], dl[0], rngs=rngs)]
        for i in range(1, len(ch) - 1):
            blocks.append(SqueezeExcitationRes2NetBlock(ch[i - 1], ch[i], cfg.enc_res2net_scale,
                                                        cfg.enc_se_channels, ks[i], dl[i], rngs=rngs))
        self.blocks = nnx.List(blocks)
        self.mfa = TimeDelayNetBlock(ch[-1], ch[-1], ks[-1], dl[-1], rngs=rngs)
        self.asp = AttentiveStatisticsPooling(ch[-1], cfg.enc_attention_channels, rngs=rngs)
        self.fc = Conv1d(ch[-1] * 2, cfg.enc_dim, 1, rngs=rngs)

    def __call__(self, mel):  # [B, T, mel_dim] -> [B, enc_dim]
        h = mel
        outs = []
        for blk in self.blocks:
            h = blk(h)
            outs.append(h)
        h = self.mfa(jnp.concatenate(outs[1:], axis=-1))
        pooled = self.asp(h)
        return self.fc(pooled[:, None, :])[:, 0, :]
