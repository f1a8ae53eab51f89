"""Side by side with transformers on the same random-weight model, in one run.

    python -m bench compare --config bench/configs/cpu_small.json --json bench/results/cpu_compare.json

One checkpoint (thinker, talker, token2wav and a ``spk_dict.pt`` voice) is built with
transformers' ``Qwen2_5OmniForConditionalGeneration`` and saved with ``save_pretrained``;
``omni_jax.load`` reads the same weights. Both sides run in one process, torch on CPU with the
same thread count. Measured, each with its hardware limit beside it:

* thinker prefill tokens/s (limit: matmul FLOPs / measured matmul throughput) and greedy decode
  tokens/s (limit: bytes read per token / measured copy bandwidth) at each batch;
* talker decode tokens/s (greedy, after a thinker reply; limit: talker bytes per token / bandwidth),
  talker prefill apart;
* DiT time per second of audio (the whole ODE solve from the same initial noise; limit: FLOPs
  per DiT evaluation x evaluations, CFG doubling the rows, / matmul throughput) and BigVGAN time
  per second of audio (limit: its convolution FLOPs / matmul throughput);
* one end-to-end text+speech turn, prompt -> text -> codes -> waveform (limit: the sum of the
  parts' limits);
* peak memory of each side: the RSS high-water mark (``VmHWM``) of a separate process that
  loads only that side's model and runs the same turn once (jax: compile included), plus the
  RSS right after loading and, for omni-jax, the bytes of live jax arrays after the turn.

Compile time is reported apart from steady-state time (omni-jax: first call minus a later
call). Every timed figure, on both sides alike, is the best of ``REPS`` (3; ``E2E_REPS`` = 2 for the
whole turn) steady-state runs after one untimed warm-up run (omni-jax's warm-up compiles), the two
sides' runs alternating (:func:`_paired`): on a shared machine whose speed drifts, the best of a few
runs is the steadiest estimate, and alternating puts both sides under the same drift. Every figure is
float32 (the CPU precision of both; token2wav is float32 on both sides whatever the load dtype).
``--memory-child`` is the internal entry point of the memory runs.
transformers' talker runs with its attention mask restored (:func:`bench.util.talker_mask_restored`:
``generate`` in transformers >= 5.18 drops an all-ones mask, and the talker skips its TMRoPE
positions and codec pad/bos embeddings without one), so "codes equal" compares the same model.

GPU mode (transformers on the same GPU and workload in the same call):

    python -m bench compare --device gpu --config bench/configs/gpu_3b_thinker.json --json out.json

runs the thinker rows only (the config has no talker: token2wav has ``bench.gpu_token2wav
--torch``), both sides in ``--dtype`` (default bfloat16) on the GPU, omni-jax with its default
attention; the limits are jax's measured copy bandwidth and bf16 matmul throughput on the device
(``bench/__main__``), and torch is synchronised inside every timed call.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from .util import talker_mask_restored, write_json

PRECISION = "float32"


REPS, E2E_REPS = 3, 2  # timed steady-state runs per figure, per side (after one warm-up run)


def _timeit(fn, reps=REPS):
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _paired(jx_run, pt_run, reps=REPS):
    """Best times of ``jx_run`` and ``pt_run``, each called ``reps`` times, alternating (jax, torch,
    jax, ...). Each returns its own elapsed seconds (a run may exclude its set-up)."""
    jx, pt = [], []
    for _ in range(reps):
        jx.append(jx_run())
        pt.append(pt_run())
    return min(jx), min(pt)


def _timed(fn):
    """``fn`` as a run for :func:`_paired`: returns its wall time."""
    def run():
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    return run


@contextlib.contextmanager
def _forward_times(module, times: list, sync=None):
    """Inside, every call of torch ``module``'s forward appends its wall time (after ``sync()``, on a
    GPU) to ``times``; the caller clears the list per run. On exit the class's forward again."""
    orig = module.forward

    @functools.wraps(orig)  # generate() validates its kwargs against forward's signature
    def forward(*a, **k):
        t = time.perf_counter()
        r = orig(*a, **k)
        if sync is not None:
            sync()
        times.append(time.perf_counter() - t)
        return r

    module.forward = forward
    try:
        yield
    finally:
        del module.forward  # the instance attribute


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    """This process's RSS high-water mark (VmHWM: unlike ru_maxrss it is not carried over from
    the parent across fork + exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --------------------------------------------------------------------------------------
# the checkpoint


def hf_config(cfg: dict):
    from transformers import Qwen2_5OmniConfig

    text = dict(cfg["text"])
    section = text.pop("mrope_section")
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": section}
    e = text["hidden_size"]
    thinker = dict(text_config=text, vision_start_token_id=151652,
                   audio_config=dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
                                     output_dim=e),
                   vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2,
                                      fullatt_block_indexes=[0], out_hidden_size=e))
    speech = "talker" in cfg and "token2wav" in cfg
    kw = {}
    if speech:
        talker = dict(cfg["talker"])
        tsec = talker.pop("mrope_section")
        talker.update(embedding_size=e, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                         "mrope_section": tsec})
        kw = dict(talker_config=talker, token2wav_config=dict(dit_config=dict(cfg["token2wav"]["dit"]),
                                                              bigvgan_config=dict(cfg["token2wav"]["bigvgan"])))
    return Qwen2_5OmniConfig(thinker_config=thinker, enable_audio_output=speech, **kw)


def build_checkpoint(cfg: dict, directory: str):
    """Random transformers model saved to ``directory`` (+ ``spk_dict.pt`` when it speaks)."""
    import torch
    from transformers import Qwen2_5OmniForConditionalGeneration

    torch.manual_seed(0)
    full = Qwen2_5OmniForConditionalGeneration(hf_config(cfg))
    full.float().eval()
    if full.has_talker:
        # A trained talker emits codec ids the DiT can embed (< num_embeds) plus its special ids; random
        # weights would pick any of the vocabulary. Zeroing the codec head's rows from num_embeds on
        # (logit 0, below the maximum of the other random logits) keeps greedy codes embeddable.
        with torch.no_grad():
            full.talker.codec_head.weight[full.config.token2wav_config.dit_config.num_embeds:] = 0
    full.save_pretrained(directory, max_shard_size="500MB")
    if full.has_talker:
        sp = cfg["speech"]
        dit = full.config.token2wav_config.dit_config
        g = torch.Generator().manual_seed(7)
        voices = {"Chelsie": {"bos_token": sp["voice_bos"], "cond": torch.randn(dit.enc_emb_dim, generator=g),
                              "ref_mel": torch.randn(sp["ref_mel_frames"], dit.mel_dim, generator=g)}}
        torch.save(voices, os.path.join(directory, "spk_dict.pt"))
        full.speaker_map = voices
    return full


# --------------------------------------------------------------------------------------
# hardware limits


def measure_bandwidth():
    a = np.ones(1 << 25, np.float32)  # 128 MB
    b = np.empty_like(a)
    t = _timeit(lambda: np.copyto(b, a), 10)
    return 2 * a.nbytes / t


def measure_matmul():
    """Best of numpy's and XLA's float32 matmul throughput (the measured hardware limit)."""
    import jax

    a = np.random.rand(1024, 1024).astype(np.float32)
    t_np = _timeit(lambda: a @ a, 20)
    x = jax.numpy.asarray(a)
    f = jax.jit(lambda m: m @ m)
    f(x).block_until_ready()
    t_jx = _timeit(lambda: f(x).block_until_ready(), 20)
    return 2 * 1024 ** 3 / min(t_np, t_jx)


def dit_flops(d: dict, frames: int, steps: int, use_cfg: bool = True) -> dict:
    """Matmul FLOPs of one ODE solve: per DiT evaluation (linear layers; attention over the keys
    of each layer's block band, ``(look_back + 1 + look_ahead) x block_size`` per query, the work
    the mask leaves: transformers computes all ``frames`` keys and masks them, omni-jax computes
    the band) x 4 evaluations per RK4 interval x (steps - 1) intervals, with the CFG half doubling
    the rows. The speaker encoder (once per call, on the reference mel) and elementwise work are
    not counted."""
    h, inner, ff = d["hidden_size"], d["num_attention_heads"] * d["head_dim"], d["hidden_size"] * d["ff_mult"]
    layers = d["num_hidden_layers"]
    band_keys = [min(frames, d["block_size"] * (1 + (i in d["look_backward_layers"]) + (i in d["look_ahead_layers"])))
                 for i in range(layers)]
    linear = 4 * h * inner + 2 * h * ff  # MACs per frame and layer
    io = (d["mel_dim"] + d["enc_dim"] + d["enc_emb_dim"] + d["emb_dim"]) * h + h * d["mel_dim"]
    per_eval_row = 2 * frames * (layers * linear + sum(2 * k * inner for k in band_keys) + io)
    rows = 2 if use_cfg else 1
    evals = 4 * (steps - 1)
    return dict(per_eval=per_eval_row * rows, evals=evals, rows=rows, total=per_eval_row * rows * evals)


def bigvgan_flops(v: dict, frames: int) -> int:
    """Convolution FLOPs of BigVGAN on ``frames`` mel frames (conv_pre, transposed convs as
    input samples x taps, every AMP-block conv, conv_post). The anti-aliased SnakeBeta
    (12-tap filters per channel, elementwise) is not counted."""
    c = v["upsample_initial_channel"]
    n = frames
    macs = n * v["mel_dim"] * c * 7
    nres = len(v["resblock_kernel_sizes"])
    for i, (s, k) in enumerate(zip(v["upsample_rates"], v["upsample_kernel_sizes"])):
        cin, cout = c // 2 ** i, c // 2 ** (i + 1)
        macs += n * cin * cout * k
        n *= s
        for j in range(nres):
            macs += 2 * len(v["resblock_dilation_sizes"][j]) * n * cout * cout * v["resblock_kernel_sizes"][j]
    macs += n * (c // 2 ** len(v["upsample_rates"])) * 7
    return 2 * macs


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        return float("nan")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# --------------------------------------------------------------------------------------
# the thinker


def _decode_target(device: str, ratio: float, frac: float) -> dict:
    """The batch-1 decode target: on CPU 3x transformers and 80% of the bandwidth roofline, on
    a GPU 75% of the roofline."""
    if device == "cpu":
        return dict(target=">= 3x transformers and >= 80% of the bandwidth roofline",
                    met=bool(ratio >= 3.0 and frac >= 0.8))
    return dict(target=">= 75% of the bandwidth roofline", met=bool(frac >= 0.75))


def thinker_rows(cfg, model, tm, bw, mm, device: str = "cpu") -> tuple[list, dict]:
    """``device``: where ``tm`` runs, ``"cpu"`` or ``"cuda"`` (then synchronised in every timed call)."""
    import jax
    import torch

    def sync():
        if device != "cpu":
            torch.cuda.synchronize()

    pbytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(model.params))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model.params))
    # per generated token: every weight but the input embedding table is read once (only B rows of
    # the table are gathered); matmul FLOPs per prompt token likewise exclude the embedding and the
    # LM head (applied to the last position only)
    emb = model.params["embed_tokens"]["embedding"][...]
    emb_bytes = int(np.prod(emb.shape)) * emb.dtype.itemsize
    head_params = 0 if model.params.get("lm_head") is None else int(np.prod(emb.shape))
    step_bytes = pbytes - emb_bytes if head_params else pbytes
    flop_params = n_params - int(np.prod(emb.shape)) - head_params
    v = cfg["text"]["vocab_size"]
    rows = []
    prompt, new = cfg["prompt"], cfg["new_tokens"]
    for b in cfg["batches"]:
        ids = np.random.RandomState(1).randint(0, v, (b, prompt))
        # omni-jax: first call compiles, then steady state
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=new, eos_token_id=[])
        first = time.perf_counter() - t
        steady = _timeit(lambda: model.generate(ids, max_new_tokens=new, eos_token_id=[]), 1)

        def jx_prefill():
            g = model.prefill(ids, max_new_tokens=new, eos_token_id=[])
            jax.block_until_ready(g.state.tokens)
            return g

        def jx_decode():
            g2 = model.prefill(ids, max_new_tokens=new, eos_token_id=[])
            jax.block_until_ready(g2.state.tokens)
            t1 = time.perf_counter()
            model.decode_steps(g2, new)
            jax.block_until_ready(g2.state.tokens)
            return time.perf_counter() - t1

        ti = torch.tensor(ids, device=device)

        def pt_prefill():
            tm(input_ids=ti, logits_to_keep=1)
            sync()

        forwards: list = []

        def pt_decode():
            """A greedy generate of ``new`` tokens; returns its time minus its own first forward (the
            prompt's prefill), i.e. the ``new - 1`` decode steps and generate's loop around them."""
            forwards.clear()
            t = time.perf_counter()
            tm.generate(input_ids=ti, attention_mask=torch.ones_like(ti), max_new_tokens=new,
                        min_new_tokens=new, do_sample=False, pad_token_id=0)
            sync()
            return time.perf_counter() - t - forwards[0]

        with torch.no_grad(), _forward_times(tm, forwards, sync):
            pt_prefill()  # warm-ups (on a GPU: kernel selection, allocator)
            pt_decode()
            jx_pre, pt_pre = _paired(_timed(jx_prefill), _timed(pt_prefill))
            jx_dec, pt_dec = _paired(jx_decode, pt_decode)
        steps = new - 1
        roof_step = step_bytes / bw
        pre_ratio, dec_ratio = pt_pre / jx_pre, pt_dec / jx_dec
        dec_frac = roof_step / (jx_dec / steps)
        rows.append(dict(
            batch=b, prompt=prompt, new=new, jax_compile_s=round(first - steady, 2),
            prefill_tok_s=dict(jax=round(b * prompt / jx_pre, 1), torch=round(b * prompt / pt_pre, 1),
                               ratio=round(pre_ratio, 2),
                               jax_frac_of_matmul_peak=round(2 * flop_params * b * prompt / jx_pre / mm, 3),
                               target="no slower than transformers", met=bool(pre_ratio >= 1.0)),
            decode_tok_s=dict(jax=round(b * steps / jx_dec, 1), torch=round(b * steps / pt_dec, 1),
                              ratio=round(dec_ratio, 2),
                              jax_frac_of_bandwidth_roofline=round(dec_frac, 3),
                              roofline_ms_per_step=round(1e3 * roof_step, 3),
                              **(_decode_target(device, dec_ratio, dec_frac) if b == 1 else {}))))
    info = dict(params=n_params, param_bytes=pbytes, step_bytes=step_bytes, flop_params=flop_params)
    return rows, info


# --------------------------------------------------------------------------------------
# speech: talker, DiT, BigVGAN, end to end


class _PatchedRandn:
    """``torch.randn`` returning ``noise`` for the DiT's initial state (shape [1, T, mel_dim])."""

    def __init__(self, noise, mel_dim):
        import torch

        self.torch, self.noise, self.mel_dim, self.orig = torch, noise, mel_dim, torch.randn

    def __enter__(self):
        torch, orig = self.torch, self.orig

        def randn(*shape, **k):
            if len(shape) == 1 and isinstance(shape[0], (list, tuple)):
                shape = tuple(shape[0])
            if len(shape) == 3 and shape[-1] == self.mel_dim:
                return torch.tensor(self.noise)[None].to(k.get("dtype") or torch.float32)
            return orig(*shape, **k)

        torch.randn = randn

    def __exit__(self, *a):
        self.torch.randn = self.orig


def _jax_turn_kwargs(sp):
    n = sp["codes"]
    return dict(return_audio=True, talker_do_sample=False, talker_max_new_tokens=n, talker_min_new_tokens=n)


def _torch_turn_kwargs(cfg):
    n = cfg["speech"]["codes"]
    new = cfg["new_tokens"]
    return dict(speaker="Chelsie", thinker_max_new_tokens=new, thinker_min_new_tokens=new, thinker_do_sample=False,
                thinker_eos_token_id=None, talker_do_sample=False, talker_max_new_tokens=n, talker_min_new_tokens=n,
                talker_eos_token_id=[8292, 8294])


def speech_rows(cfg, model, tm, bw, mm) -> dict:
    import jax
    import torch

    from omni_jax.token2wav import bigvgan, dit_sample

    sp = cfg["speech"]
    n_codes, new, prompt = sp["codes"], cfg["new_tokens"], cfg["prompt"]
    dcfg, vcfg = model.config.token2wav.dit, model.config.token2wav.bigvgan
    frames = n_codes * dcfg.repeats
    hop = int(np.prod(vcfg.upsample_rates))
    audio_s = frames * hop / 24000
    ids = np.random.RandomState(1).randint(0, cfg["text"]["vocab_size"], (1, prompt))
    noise = np.random.RandomState(3).randn(frames, dcfg.mel_dim).astype(np.float32)
    voice = model.voices["Chelsie"]
    out: dict = dict(codes=n_codes, mel_frames=frames, audio_s=round(audio_s, 3), prompt=prompt, text_tokens=new)

    # ---- talker: greedy, after the thinker's greedy reply (prefill timed apart)
    def jx_talker():
        gen = model.prefill(ids, max_new_tokens=new, eos_token_id=[], return_audio=True)
        model.decode_steps(gen, new)
        jax.block_until_ready(gen.state.tokens)
        t = time.perf_counter()
        run = model.talker_start(gen, speaker="Chelsie", seed=0, talker_do_sample=False,
                                 talker_max_new_tokens=n_codes, talker_min_new_tokens=n_codes)
        jax.block_until_ready(run.state.tokens)
        t1 = time.perf_counter()
        model.talker_advance(run, gen, None)
        jax.block_until_ready(run.state.tokens)
        t2 = time.perf_counter()
        return t1 - t, t2 - t1, run.codes()[0]

    c_pre, c_dec, _ = jx_talker()
    runs = []

    talker = tm.talker
    calls: list = []
    orig_gen, orig_t2w = talker.generate, tm.token2wav.forward
    captured = {}

    def timed_generate(**kw):
        calls.clear()
        t = time.perf_counter()
        r = orig_gen(**kw)
        captured["total"] = time.perf_counter() - t
        captured["prefill"] = calls[0]
        captured["codes"] = r[0, kw["input_ids"].shape[1]:].numpy()
        return r

    talker.generate = timed_generate
    tm.token2wav.forward = lambda code, **kw: torch.zeros(1, 10)
    pt_runs = []
    try:
        with torch.no_grad(), _forward_times(talker, calls), talker_mask_restored(tm):
            for i in range(1 + REPS):  # torch's warm-up run, then REPS timed, alternating with omni-jax's
                if i:
                    runs.append(jx_talker())
                tm.generate(input_ids=torch.tensor(ids), attention_mask=torch.ones(1, prompt, dtype=torch.long),
                            **_torch_turn_kwargs(cfg))
                pt_runs.append((captured["prefill"], captured["total"] - captured["prefill"]))
            pt_runs = pt_runs[1:]
    finally:
        talker.generate, tm.token2wav.forward = orig_gen, orig_t2w
    pt_tpre, pt_tdec = min(r[0] for r in pt_runs), min(r[1] for r in pt_runs)
    jx_tpre, jx_tdec = min(r[0] for r in runs), min(r[1] for r in runs)
    jx_codes = runs[-1][2]
    pt_codes = captured["codes"]
    tparams = jax.tree.leaves(model.talker[1])
    tbytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in tparams)
    temb = model.talker[1]["embed_tokens"]["embedding"][...]
    tstep_bytes = tbytes - int(np.prod(temb.shape)) * temb.dtype.itemsize  # the codec embedding is gathered
    steps = n_codes - 1
    troof = tstep_bytes / bw
    out["talker"] = dict(
        prefill_s=dict(jax=round(jx_tpre, 4), torch=round(pt_tpre, 4), ratio=round(pt_tpre / jx_tpre, 2)),
        decode_tok_s=dict(jax=round(steps / jx_tdec, 1), torch=round(steps / pt_tdec, 1),
                          ratio=round(pt_tdec / jx_tdec, 2),
                          jax_frac_of_bandwidth_roofline=round(troof / (jx_tdec / steps), 3),
                          roofline_ms_per_step=round(1e3 * troof, 3)),
        jax_compile_s=round(c_pre + c_dec - jx_tpre - jx_tdec, 2), step_bytes=tstep_bytes,
        codes_equal=bool(len(jx_codes) == len(pt_codes) and np.array_equal(jx_codes, pt_codes)))
    codes = np.asarray(pt_codes[:n_codes], np.int32)
    _log(f"talker: {out['talker']}")

    # ---- DiT: the ODE solve from the same initial noise
    t2w = model.token2wav_params
    steps_ode = sp["ode_steps"]

    def jx_dit():
        return jax.block_until_ready(dit_sample(t2w.code2wav_dit_model, dcfg, codes[None], voice.cond, voice.ref_mel,
                                                noise[None], steps=steps_ode))

    t = time.perf_counter()
    jx_dit()
    dit_first = time.perf_counter() - t
    jx_mel = np.asarray(jx_dit())
    dit_t = tm.token2wav.code2wav_dit_model
    cond_t = torch.tensor(np.asarray(voice.cond, np.float32)).reshape(1, -1)
    ref_t = torch.tensor(np.asarray(voice.ref_mel, np.float32)).reshape(1, -1, dcfg.mel_dim)
    pt_mel = None

    def pt_dit():
        nonlocal pt_mel
        with torch.no_grad(), _PatchedRandn(noise, dcfg.mel_dim):
            pt_mel = dit_t.sample(cond_t, ref_t, torch.tensor(codes[None], dtype=torch.long), num_steps=steps_ode)

    pt_dit()  # warm-up
    jx_dit_s, pt_dit_s = _paired(_timed(jx_dit), _timed(pt_dit))
    fl = dit_flops(cfg["token2wav"]["dit"], frames, steps_ode)
    dit_ratio = pt_dit_s / jx_dit_s
    dit_frac = fl["total"] / jx_dit_s / mm
    out["dit"] = dict(
        s_per_audio_s=dict(jax=round(jx_dit_s / audio_s, 3), torch=round(pt_dit_s / audio_s, 3),
                           ratio=round(dit_ratio, 2)),
        solve_s=dict(jax=round(jx_dit_s, 3), torch=round(pt_dit_s, 3)), jax_compile_s=round(dit_first - jx_dit_s, 2),
        gflop=round(fl["total"] / 1e9, 1), gflop_per_eval=round(fl["per_eval"] / 1e9, 3), evals=fl["evals"],
        rows_per_eval=fl["rows"], jax_frac_of_matmul_peak=round(dit_frac, 3),
        matmul_limit_s_per_audio_s=round(fl["total"] / mm / audio_s, 3),
        mel_rel_err=_rel(jx_mel[0], pt_mel[0].permute(1, 0).numpy()),
        target=">= 1.5x transformers and >= 70% of the measured matmul throughput",
        met=bool(dit_ratio >= 1.5 and dit_frac >= 0.7))

    # ---- BigVGAN on the same mel
    _log(f"dit: {out['dit']}")
    voc = t2w.code2wav_bigvgan_model

    def jx_voc():
        return jax.block_until_ready(bigvgan(voc, vcfg, jx_mel))

    t = time.perf_counter()
    jx_voc()
    voc_first = time.perf_counter() - t
    jx_wav = np.asarray(jx_voc())
    mel_t = torch.tensor(jx_mel).permute(0, 2, 1).contiguous()
    pt_wav = None

    def pt_voc():
        nonlocal pt_wav
        with torch.no_grad():
            pt_wav = tm.token2wav.code2wav_bigvgan_model(mel_t)

    pt_voc()  # warm-up
    jx_voc_s, pt_voc_s = _paired(_timed(jx_voc), _timed(pt_voc))
    vfl = bigvgan_flops(cfg["token2wav"]["bigvgan"], frames)
    out["bigvgan"] = dict(
        s_per_audio_s=dict(jax=round(jx_voc_s / audio_s, 3), torch=round(pt_voc_s / audio_s, 3),
                           ratio=round(pt_voc_s / jx_voc_s, 2)),
        run_s=dict(jax=round(jx_voc_s, 3), torch=round(pt_voc_s, 3)), jax_compile_s=round(voc_first - jx_voc_s, 2),
        gflop=round(vfl / 1e9, 1), jax_frac_of_matmul_peak=round(vfl / jx_voc_s / mm, 3),
        matmul_limit_s_per_audio_s=round(vfl / mm / audio_s, 3),
        wav_rel_err=_rel(jx_wav.reshape(-1), pt_wav.numpy().reshape(-1)))

    # ---- one end-to-end text + speech turn
    _log(f"bigvgan: {out['bigvgan']}")
    kw = _jax_turn_kwargs(sp)

    jo = None

    def jx_turn():
        nonlocal jo
        jo = model.generate(ids, max_new_tokens=new, eos_token_id=[], dit_noise=[noise], **kw)

    t = time.perf_counter()
    jx_turn()
    e2e_first = time.perf_counter() - t
    res = None

    def pt_turn():
        nonlocal res
        with torch.no_grad(), _PatchedRandn(noise, dcfg.mel_dim), talker_mask_restored(tm):
            res = tm.generate(input_ids=torch.tensor(ids), attention_mask=torch.ones(1, prompt, dtype=torch.long),
                              **_torch_turn_kwargs(cfg))

    pt_turn()  # warm-up
    jx_e2e, pt_e2e = _paired(_timed(jx_turn), _timed(pt_turn), E2E_REPS)
    seqs, wav = res
    out["e2e"] = dict(
        s=dict(jax=round(jx_e2e, 3), torch=round(pt_e2e, 3), ratio=round(pt_e2e / jx_e2e, 2)),
        real_time_factor=dict(jax=round(jx_e2e / audio_s, 3), torch=round(pt_e2e / audio_s, 3)),
        jax_compile_s=round(e2e_first - jx_e2e, 2), limit_s=None,  # filled in by run()
        text_equal=bool(np.array_equal(jo.sequences, seqs.numpy())),
        codes_equal=bool(np.array_equal(jo.codec_ids[0], np.asarray(pt_codes))),
        wav_rel_err=_rel(jo.audio[0], wav.numpy()))
    return out


# --------------------------------------------------------------------------------------
# peak memory, one side per process


def memory_child(side: str, directory: str, cfg: dict) -> dict:
    threads = cfg.get("threads") or os.cpu_count()
    sp = cfg["speech"]
    prompt, new = cfg["prompt"], cfg["new_tokens"]
    ids = np.random.RandomState(1).randint(0, cfg["text"]["vocab_size"], (1, prompt))
    frames = sp["codes"] * cfg["token2wav"]["dit"]["repeats"]
    noise = np.random.RandomState(3).randn(frames, cfg["token2wav"]["dit"]["mel_dim"]).astype(np.float32)
    base = _rss_mb()
    if side == "jax":
        import jax

        import omni_jax

        model = omni_jax.load(directory, dtype=PRECISION, attention="xla")
        loaded = _rss_mb()
        out = model.generate(ids, max_new_tokens=new, eos_token_id=[], dit_noise=[noise], **_jax_turn_kwargs(sp))
        live = sum(a.nbytes for a in jax.live_arrays())
        extra = dict(jax_live_array_MB=round(live / 2 ** 20, 1),
                     jax_device_memory_stats=jax.devices()[0].memory_stats())
        n = len(out.audio[0])
    else:
        import torch
        from transformers import Qwen2_5OmniForConditionalGeneration

        torch.set_num_threads(threads)
        tm = Qwen2_5OmniForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
        loaded = _rss_mb()
        with torch.no_grad(), _PatchedRandn(noise, cfg["token2wav"]["dit"]["mel_dim"]), talker_mask_restored(tm):
            _, wav = tm.generate(input_ids=torch.tensor(ids), attention_mask=torch.ones(1, prompt, dtype=torch.long),
                                 **_torch_turn_kwargs(cfg))
        extra = {}
        n = int(wav.numel())
    return dict(side=side, rss_at_start_MB=round(base, 1), rss_after_load_MB=round(loaded, 1),
                peak_rss_MB=round(_peak_rss_mb(), 1), samples=n, **extra)


def measure_memory(cfg_path: str, directory: str) -> dict:
    out = {}
    for side in ("jax", "torch"):
        p = subprocess.run([sys.executable, "-m", "bench.compare", "--config", cfg_path, "--memory-child", side,
                            "--dir", directory], capture_output=True, text=True,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        out[side] = json.loads(lines[-1]) if p.returncode == 0 and lines else dict(error=p.stderr[-2000:])
    return out


# --------------------------------------------------------------------------------------


def run(cfg: dict, cfg_path: str | None = None, memory: bool = True, device: str = "cpu",
        dtype: str = PRECISION) -> dict:
    import jax
    import torch

    threads = cfg.get("threads") or os.cpu_count()
    torch.set_num_threads(threads)
    gpu = device == "gpu"
    if gpu:
        if not torch.cuda.is_available() or jax.default_backend() != "gpu":
            raise SystemExit(f"--device gpu needs a GPU for both torch (cuda available: {torch.cuda.is_available()}) "
                             f"and jax (backend: {jax.default_backend()})")
        if "talker" in cfg:
            raise SystemExit("--device gpu runs the thinker rows only: use a config without a talker "
                             "(bench/configs/gpu_3b_thinker.json)")
    d = tempfile.mkdtemp(prefix="omni-bench-")
    try:  # the checkpoint directory goes whether the run finishes or fails
        return _run(cfg, cfg_path, d, memory=memory, gpu=gpu, dtype=dtype, threads=threads)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _run(cfg: dict, cfg_path: str | None, d: str, *, memory: bool, gpu: bool, dtype: str, threads: int) -> dict:
    import jax
    import torch

    import omni_jax

    full = build_checkpoint(cfg, d)
    tm = full.thinker
    if gpu:
        tm = tm.to("cuda", dtype=getattr(torch, dtype))
    t0 = time.perf_counter()
    model = omni_jax.load(d, dtype=dtype, attention=None if gpu else "xla")
    load_s = time.perf_counter() - t0
    if gpu:
        from .__main__ import measure_bandwidth as jax_bandwidth, measure_matmul as jax_matmul

        bw, mm = jax_bandwidth(), jax_matmul()
    else:
        bw, mm = measure_bandwidth(), measure_matmul()
    _log(f"loaded; copy {bw / 1e9:.1f} GB/s, matmul {mm / 1e9:.1f} GFLOP/s; thinker rows")
    rows, info = thinker_rows(cfg, model, tm, bw, mm, device="cuda" if gpu else "cpu")
    _log(f"thinker rows: {rows}")
    machine = (f"{jax.devices()[0].device_kind} ({torch.cuda.get_device_name()} for torch)" if gpu
               else f"{os.cpu_count()} CPU cores")
    res = dict(machine=machine, backend=jax.default_backend(), jax=jax.__version__,
               torch=torch.__version__, threads=threads, precision=dtype, params=info["params"],
               param_bytes=info["param_bytes"], copy_bandwidth_GBs=round(bw / 1e9, 2),
               matmul_GFLOPs=round(mm / 1e9, 1), load_s=round(load_s, 2), date=time.strftime("%Y-%m-%d"),
               config=cfg, rows=rows)
    if full.has_talker:
        _log("speech rows")
        speech = speech_rows(cfg, model, full, bw, mm)
        # the turn's limit: prompt prefill at the matmul limit + text decode at the bandwidth limit + the
        # talker's decode limit + DiT and BigVGAN at the matmul limit
        limit = (2 * info["flop_params"] * cfg["prompt"] / mm + (cfg["new_tokens"] - 1) * info["step_bytes"] / bw
                 + (speech["codes"] - 1) * speech["talker"]["decode_tok_s"]["roofline_ms_per_step"] / 1e3
                 + speech["dit"]["gflop"] * 1e9 / mm + speech["bigvgan"]["gflop"] * 1e9 / mm)
        speech["e2e"]["limit_s"] = round(limit, 3)
        speech["e2e"]["jax_frac_of_limit"] = round(limit / speech["e2e"]["s"]["jax"], 3)
        res["speech"] = speech
        if memory and cfg_path:
            del model, full, tm
            import gc

            gc.collect()
            _log(f"speech: {speech}; memory processes")
            res["memory"] = dict(
                what="peak RSS (VmHWM) of a separate process that loads only that side's model from the same "
                     "checkpoint and runs the same text+speech turn once (omni-jax: compile included); "
                     "RSS after loading; omni-jax also: bytes of live jax arrays after the turn (jax's CPU "
                     "device reports no memory stats)",
                **measure_memory(cfg_path, d))
    # the limits again at the end: on a shared machine the speed drifts during a run; fractions use the
    # start's figures, and a drift beyond 15% is flagged (ratios, measured back to back, are robust to it)
    bw_end, mm_end = (jax_bandwidth(), jax_matmul()) if gpu else (measure_bandwidth(), measure_matmul())
    res["limits_at_end"] = dict(copy_bandwidth_GBs=round(bw_end / 1e9, 2), matmul_GFLOPs=round(mm_end / 1e9, 1))
    res["limits_drift"] = bool(max(mm_end / mm, mm / mm_end, bw_end / bw, bw / bw_end) > 1.15)
    return res


def _log(msg: str) -> None:
    print(f"[bench.compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _met(x) -> str:
    return "met" if x else "missed"


def print_table(res: dict) -> None:
    print(f"{res['machine']}, jax {res['jax']} vs torch {res['torch']} ({res['threads']} threads), "
          f"{res['precision']}; copy {res['copy_bandwidth_GBs']} GB/s, matmul {res['matmul_GFLOPs']} GFLOP/s")
    if res.get("limits_drift"):
        end = res["limits_at_end"]
        print(f"  the machine's speed drifted during the run: at the end copy {end['copy_bandwidth_GBs']} GB/s, "
              f"matmul {end['matmul_GFLOPs']} GFLOP/s (fractions of the limits are unreliable; ratios hold)")
    print("thinker batch | prefill tok/s jax / torch (x) [of peak] | decode tok/s jax / torch (x) [of roofline] "
          "| compile s")
    for r in res["rows"]:
        p, d = r["prefill_tok_s"], r["decode_tok_s"]
        tgt = f"  decode target {d['target']}: {_met(d['met'])}" if "met" in d else ""
        print(f"{r['batch']:13d} | {p['jax']:9.1f} / {p['torch']:9.1f} ({p['ratio']:.2f}x) "
              f"[{p['jax_frac_of_matmul_peak']:.2f}] | {d['jax']:8.1f} / {d['torch']:8.1f} ({d['ratio']:.2f}x) "
              f"[{d['jax_frac_of_bandwidth_roofline']:.2f}] | {r['jax_compile_s']:.1f}  "
              f"prefill target >= 1x: {_met(p['met'])}{tgt}")
    s = res.get("speech")
    if not s:
        return
    t, dt, v, e = s["talker"], s["dit"], s["bigvgan"], s["e2e"]
    print(f"speech: {s['codes']} codes -> {s['mel_frames']} mel frames -> {s['audio_s']} s of audio; "
          f"prompt {s['prompt']}, {s['text_tokens']} text tokens")
    print(f"talker decode tok/s  {t['decode_tok_s']['jax']:8.1f} / {t['decode_tok_s']['torch']:8.1f} "
          f"({t['decode_tok_s']['ratio']:.2f}x) [of roofline {t['decode_tok_s']['jax_frac_of_bandwidth_roofline']:.2f}]"
          f"  prefill s {t['prefill_s']['jax']} / {t['prefill_s']['torch']}  compile {t['jax_compile_s']} s"
          f"  codes equal: {t['codes_equal']}")
    print(f"DiT s per audio s    {dt['s_per_audio_s']['jax']:8.3f} / {dt['s_per_audio_s']['torch']:8.3f} "
          f"({dt['s_per_audio_s']['ratio']:.2f}x) [of matmul peak {dt['jax_frac_of_matmul_peak']:.2f}; limit "
          f"{dt['matmul_limit_s_per_audio_s']}]  compile {dt['jax_compile_s']} s  target 1.5x & 70%: "
          f"{_met(dt['met'])}  mel rel err {dt['mel_rel_err']:.1e}")
    print(f"BigVGAN s per audio s {v['s_per_audio_s']['jax']:7.3f} / {v['s_per_audio_s']['torch']:8.3f} "
          f"({v['s_per_audio_s']['ratio']:.2f}x) [of matmul peak {v['jax_frac_of_matmul_peak']:.2f}; limit "
          f"{v['matmul_limit_s_per_audio_s']}]  compile {v['jax_compile_s']} s  wav rel err {v['wav_rel_err']:.1e}")
    print(f"end-to-end turn s    {e['s']['jax']:8.3f} / {e['s']['torch']:8.3f} ({e['s']['ratio']:.2f}x) "
          f"[limit {e['limit_s']} s: {e.get('jax_frac_of_limit')}]  compile {e['jax_compile_s']} s  "
          f"text equal {e['text_equal']}, codes equal {e['codes_equal']}, wav rel err {e['wav_rel_err']:.1e}")
    m = res.get("memory")
    if m:
        j, p = m.get("jax", {}), m.get("torch", {})
        print(f"peak RSS MB          {j.get('peak_rss_MB')} / {p.get('peak_rss_MB')}  (after load "
              f"{j.get('rss_after_load_MB')} / {p.get('rss_after_load_MB')}; jax live arrays "
              f"{j.get('jax_live_array_MB')} MB)")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench compare")
    p.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "configs", "cpu_small.json"))
    p.add_argument("--json", default=None)
    p.add_argument("--no-memory", action="store_true", help="skip the two peak-memory processes")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="gpu: both sides on the GPU, thinker rows only (see the module docstring)")
    p.add_argument("--dtype", default=None, help="load dtype of both sides (default: float32 on cpu, "
                                                 "bfloat16 on gpu)")
    p.add_argument("--memory-child", choices=("jax", "torch"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    with open(args.config) as f:
        cfg = json.load(f)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.dir, cfg)))
        return
    dtype = args.dtype or ("bfloat16" if args.device == "gpu" else PRECISION)
    if dtype not in ("float32", "bfloat16", "float16"):
        p.error(f"--dtype {dtype}: choose float32, bfloat16 or float16")
    res = run(cfg, args.config, memory=not args.no_memory and args.device == "cpu", device=args.device, dtype=dtype)
    print_table(res)
    # the file's profile_passes (the README's profile-pass history, kept by hand beside the figures)
    # survive a re-run
    write_json(args.json, res, keep=("profile_passes",))


if __name__ == "__main__":
    main()
