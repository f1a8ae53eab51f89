"""Codec ids to speech: the whole-reply Token2Wav decode (DiT then BigVGAN) of a batch of rows.
The streamed decode of one reply is omni_jax.streaming.StreamingToken2Wav; both draw the DiT's
noise per mel frame from the same key (engine.noise_key), so they decode the same codes alike."""

from __future__ import annotations

import numpy as np

from . import layers
from .engine import noise_key
from .errors import InputError
from .streaming import frame_noise
from .token2wav import bigvgan, dit_sample


def speak(t2w, cfg, voice, codes_list, noise_list, seed, *, impl) -> list[np.ndarray]:
    """Codec ids of each row -> its waveform (float32, 24 kHz) with ``voice`` (an omni_jax.voices.Voice),
    through ``t2w`` (presplit Token2Wav parts, omni_jax.token2wav.presplit_token2wav). ``noise_list``:
    per row the DiT's initial state, or None to draw it from ``seed`` (engine.noise_key).

    Rows decoded together: the DiT runs the rows as one batch with key padding and each row's
    own noise (the reference decodes one row at a time: the same numbers); BigVGAN per row."""
    dcfg, vcfg = cfg.dit, cfg.bigvgan
    rows = []
    for r, c in enumerate(codes_list):
        c = np.asarray(c)
        if c.ndim != 1 or (c.size and (c.dtype.kind not in "iu" or c.min() < 0 or c.max() >= dcfg.num_embeds)):
            raise InputError(f"codes: expected a 1-D array of codec ids in [0, {dcfg.num_embeds}), got "
                             f"shape {list(c.shape)}")
        if c.size * dcfg.repeats > dcfg.max_position_embeddings:
            raise InputError(f"codes: {c.size} codes make {c.size * dcfg.repeats} mel frames, beyond the DiT's "
                             f"max_position_embeddings ({dcfg.max_position_embeddings})")
        rows.append(c.astype(np.int32))
    lens = np.asarray([len(c) for c in rows], np.int32)
    out = [np.zeros((0,), np.float32) for _ in rows]
    live = [r for r in range(len(rows)) if lens[r] > 0]
    if not live:
        return out
    # the DiT's code bucket from 32: padding below a third (powers of two ran 65 codes as 128)
    n = layers.half_octave_bucket(int(lens.max()), 32)
    codes = np.zeros((len(live), n), np.int32)
    noise = np.zeros((len(live), n * dcfg.repeats, dcfg.mel_dim), np.float32)
    for i, r in enumerate(live):
        codes[i, :lens[r]] = rows[r]
        if noise_list is not None:
            nz = np.asarray(noise_list[r], np.float32)
            if nz.shape != (lens[r] * dcfg.repeats, dcfg.mel_dim):
                raise InputError(f"dit_noise[{r}]: expected shape [{lens[r] * dcfg.repeats}, {dcfg.mel_dim}] "
                                 f"(2 x codes, mel_dim), got {list(nz.shape)}")
        else:  # counter-based per mel frame: the streamed decode draws the same noise
            nz = frame_noise(noise_key(seed, r), 0, int(lens[r]) * dcfg.repeats, dcfg.mel_dim)
        noise[i, :lens[r] * dcfg.repeats] = nz
    mel = dit_sample(t2w.code2wav_dit_model, dcfg, codes, voice.cond, voice.ref_mel, noise,
                     code_lengths=lens[live], impl=impl)
    # the vocoder at the DiT's bucketed length with the row's valid frames: one compiled program per
    # bucket, and the row's samples equal the vocoder on it alone (token2wav.bigvgan_fn); a row at a
    # time, as the vocoder's activations are large (hundreds of MB per row for a long reply)
    for i, r in enumerate(live):
        frames = int(lens[r]) * dcfg.repeats
        wav = np.asarray(bigvgan(t2w.code2wav_bigvgan_model, vcfg, mel[i:i + 1], lengths=[frames])[0], np.float32)
        out[r] = wav[:frames * (wav.shape[0] // mel.shape[1])].copy()
    return out
