"""The DiT's ODE solve: codec ids + voice + initial noise -> mel, as one jitted program.

Reference semantics kept exactly (``Qwen2_5OmniToken2WavDiTModel.sample``):

* classifier-free guidance: a second batch half whose speaker vector and reference mel are zeros
  and whose codes are all code 0; ``pred = c + (c - u) * guidance_scale``. With
  ``guidance_scale < 1e-5`` the reference skips the second half, and so does this;
* time grid ``linspace(0, 1, steps)`` then sway ``t + s * (cos(pi/2 t) - 1 + t)`` (:func:`time_grid`):
  ``steps - 1`` intervals, each one Kutta 3/8-rule RK4 step of four DiT evaluations, in the
  reference's operation order. The whole ODE is one ``lax.scan`` inside one ``jit``.

The program is :func:`_dit_sample_jit`, a module-level function of the split DiT (static structure,
leaves) and the inputs; guidance scale and time grid are traced, so they cause no recompiles.
:func:`dit_sample` validates the inputs and calls it at :data:`MATMUL_PRECISION`;
:func:`dit_sample_fn` is its traceable body. ``code_lengths`` lets rows padded to a common (bucketed)
length give exactly their unpadded mel over their valid frames: padded keys are masked out of
attention, and nothing else in the DiT mixes time steps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..attention import default_impl
from ..config import DiTConfig
from ..errors import InputError
from .dit import DiT, _dit_rope, dit_conditioning, dit_eval, dit_plan
from .split import MATMUL_PRECISION, Split, presplit

_F32 = jnp.float32


def time_grid(steps: int, sway: float | None) -> np.ndarray:
    """The reference's ODE time points (float32, computed like ``torch.linspace`` + sway)."""
    if steps < 2:
        raise InputError(f"token2wav: steps={steps}; need at least 2 time points")
    step = np.float32(1.0) / np.float32(steps - 1)
    i = np.arange(steps)
    # torch.linspace fills the first half from the start and the second half from the end
    t = np.where(i < steps // 2, i.astype(np.float32) * step,
                 np.float32(1.0) - (steps - 1 - i).astype(np.float32) * step).astype(np.float32)
    if sway is not None:
        s = np.float32(sway)
        t = (t + s * (np.cos(np.float32(np.pi / 2) * t).astype(np.float32) - np.float32(1.0) + t)).astype(np.float32)
    return t


def _broadcast_speaker(cfg: DiTConfig, b, cond, ref_mel):
    cond = jnp.asarray(cond, _F32)
    ref_mel = jnp.asarray(ref_mel, _F32)
    if cond.ndim == 1:
        cond = cond[None]
    if ref_mel.ndim == 2:
        ref_mel = ref_mel[None]
    return jnp.broadcast_to(cond, (b, cond.shape[-1])), jnp.broadcast_to(ref_mel, (b, *ref_mel.shape[1:]))


def dit_sample_fn(dit: DiT, cfg: DiTConfig, codes, cond, ref_mel, noise, *, steps: int = 10,
                  guidance_scale=0.5, sway: float | None = -1.0, code_lengths=None, impl: str = "xla",
                  use_cfg: bool | None = None, time_points=None):
    """Traceable body of :func:`dit_sample` (call it inside your own ``jit``).

    ``guidance_scale`` may be traced when ``use_cfg`` (whether the unconditioned half runs:
    the reference skips it when ``guidance_scale < 1e-5``) is given; ``time_points`` (``[steps]``,
    from :func:`time_grid`) may be traced, replacing ``steps``/``sway``.
    """
    b, n = codes.shape
    tlen = n * cfg.repeats
    cond, ref_mel = _broadcast_speaker(cfg, b, cond, ref_mel)
    if use_cfg is None:
        use_cfg = not guidance_scale < 1e-5
    feats = dit_conditioning(dit, cfg, codes, cond, ref_mel, cfg_half=use_cfg)
    kv_valid = None
    if code_lengths is not None:
        kv_valid = jnp.arange(tlen)[None, :] < (jnp.asarray(code_lengths, jnp.int32) * cfg.repeats)[:, None]
        if use_cfg:
            kv_valid = jnp.concatenate([kv_valid, kv_valid], axis=0)
    rope = _dit_rope(cfg, tlen)
    third, two_thirds = 1.0 / 3.0, 2.0 / 3.0
    grid = jnp.asarray(time_grid(steps, sway) if time_points is None else time_points, _F32)
    t0, t1 = grid[:-1], grid[1:]
    dts = t1 - t0
    # the four RK4 stage times of every interval, in evaluation order [intervals * 4]
    stage_t = jnp.stack([t0, t0 + dts * third, t0 + dts * two_thirds, t1], axis=1)
    plan = dit_plan(dit, cfg, feats, stage_t.reshape(-1))  # once, outside the ODE loops

    def velocity(e, y):
        x = jnp.concatenate([y, y], axis=0) if use_cfg else y
        out = dit_eval(plan, cfg, x, e, kv_valid=kv_valid, rope=rope, impl=impl)
        if not use_cfg:
            return out
        c, u = out[:b], out[b:]
        return c + (c - u) * guidance_scale

    def rk4_38(y, xs):
        """Kutta's 3/8 rule, in the reference's operation order:
        k1 = f(t0, y); k2 = f(t0 + dt/3, y + dt k1 / 3); k3 = f(t0 + 2dt/3, y + dt (k2 - k1/3));
        k4 = f(t1, y + dt (k1 - k2 + k3)); y1 = y + (k1 + 3 (k2 + k3) + k4) dt / 8.
        The four stages run as a scan over one DiT call site (one compiled DiT, not four)."""
        i, dt = xs
        stage_y = [
            lambda ks: y,
            lambda ks: y + dt * ks[0] * third,
            lambda ks: y + dt * (ks[1] - ks[0] * third),
            lambda ks: y + dt * (ks[0] - ks[1] + ks[2]),
        ]

        def stage(ks, s):
            k = velocity(4 * i + s, jax.lax.switch(s, stage_y, ks))
            return ks.at[s].set(k), None

        ks, _ = jax.lax.scan(stage, jnp.zeros((4, *y.shape), _F32), jnp.arange(4))
        k1, k2, k3, k4 = ks[0], ks[1], ks[2], ks[3]
        return y + (k1 + 3 * (k2 + k3) + k4) * dt / 8, None

    y, _ = jax.lax.scan(rk4_38, jnp.asarray(noise, _F32), (jnp.arange(dts.shape[0]), dts))
    return y


@functools.partial(jax.jit, static_argnames=("structure", "cfg", "use_cfg", "impl"))
def _dit_sample_jit(structure, leaves, codes, cond, ref_mel, noise, code_lengths, time_points, guidance_scale, *,
                    cfg, use_cfg, impl):
    # only the structure is static: guidance scale and time grid are traced (no recompiles)
    dit = structure.merge(leaves)
    return dit_sample_fn(dit, cfg, codes, cond, ref_mel, noise, guidance_scale=guidance_scale,
                         code_lengths=code_lengths, impl=impl, use_cfg=use_cfg, time_points=time_points)


def _check_codes(cfg: DiTConfig, codes, noise, code_lengths):
    codes = jnp.asarray(codes)
    if codes.ndim == 1:
        codes = codes[None]
    if codes.ndim != 2 or not jnp.issubdtype(codes.dtype, jnp.integer):
        raise InputError(f"token2wav: codes must be integer [batch, n_codes], got {codes.dtype} {list(codes.shape)}")
    b, n = codes.shape
    tlen = n * cfg.repeats
    if tlen > cfg.max_position_embeddings:
        raise InputError(f"token2wav: {n} codes give {tlen} mel frames, more than dit_config.max_position_embeddings "
                         f"({cfg.max_position_embeddings})")
    try:
        c = np.asarray(codes)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):  # traced
        c = None
    if c is not None:
        if c.size and (c.min() < 0 or c.max() > cfg.num_embeds):
            raise InputError(f"token2wav: codec ids must lie in [0, {cfg.num_embeds}], got [{c.min()}, {c.max()}]")
    noise = jnp.asarray(noise, _F32)
    if noise.ndim == 2:
        noise = noise[None]
    if noise.shape != (b, tlen, cfg.mel_dim):
        raise InputError(f"token2wav: noise has shape {list(noise.shape)}, expected {[b, tlen, cfg.mel_dim]} "
                         f"(batch, {cfg.repeats} * n_codes, mel_dim)")
    if code_lengths is not None:
        code_lengths = jnp.asarray(code_lengths, jnp.int32).reshape(b)
    return codes.astype(jnp.int32), noise, code_lengths


def dit_sample(dit: DiT | Split, cfg: DiTConfig, codes, cond, ref_mel, noise, *, steps: int = 10,
               guidance_scale: float = 0.5, sway: float | None = -1.0, code_lengths=None, impl: str | None = None):
    """Codec ids -> mel ``[B, repeats * n_codes, mel_dim]`` (time-major), one jitted ODE solve.

    ``codes [B, n]`` (or ``[n]``), ``cond [B, enc_emb_dim]`` or ``[enc_emb_dim]`` (the voice's
    ``cond``), ``ref_mel [B, T_ref, mel_dim]`` or ``[T_ref, mel_dim]``, ``noise [B, repeats * n,
    mel_dim]``: the initial state (the reference draws it with ``torch.randn``).
    ``code_lengths [B]``: valid codes per row when rows are padded (see the module notes).
    Matches ``Qwen2_5OmniToken2WavDiTModel.sample(...).permute(0, 2, 1)``.
    """
    codes, noise, code_lengths = _check_codes(cfg, codes, noise, code_lengths)
    cond, ref_mel = _broadcast_speaker(cfg, codes.shape[0], cond, ref_mel)  # one trace for [D] and [B, D]
    if cond.shape[-1] != cfg.enc_emb_dim or ref_mel.shape[-1] != cfg.mel_dim:
        raise InputError(f"token2wav: cond {list(cond.shape)} / ref_mel {list(ref_mel.shape)} do not match "
                         f"enc_emb_dim={cfg.enc_emb_dim} / mel_dim={cfg.mel_dim}")
    split = presplit(dit)
    grid = time_grid(int(steps), None if sway is None else float(sway))
    with jax.default_matmul_precision(MATMUL_PRECISION):
        return _dit_sample_jit(split.structure, split.leaves, codes, cond, ref_mel, noise, code_lengths, grid,
                               np.float32(guidance_scale), cfg=cfg, use_cfg=not float(guidance_scale) < 1e-5,
                               impl=impl or default_impl())


def dit_noise(key, cfg: DiTConfig, batch: int, n_codes: int):
    """Standard-normal initial state ``[batch, repeats * n_codes, mel_dim]``."""
    return jax.random.normal(key, (batch, n_codes * cfg.repeats, cfg.mel_dim), _F32)
