"""Load generator for ``omni-jax serve`` on loopback, against the same requests run one by one offline.

    python -m bench serve [--model DIR] [--concurrency 1 8 32] [--requests 32] [--duration 120]
                          [--max-tokens 16] [--audio-every 4] [--json bench/results/cpu_serve.json]

Starts the server in-process on 127.0.0.1 (uvicorn, a free port), compiles the decode programs of
every occupancy bucket (:meth:`Engine.precompile`) and warms the rest up with one untimed round
(``warmup_s``; the compile counts after it are checked unchanged at the end), then for each concurrency ``c`` runs up to ``--requests`` streamed
requests from ``c`` client threads (bounded by ``--duration`` seconds: no new request starts
after it). Each request is a distinct prompt, greedy, ``ignore_eos`` (fixed length); every
``--audio-every``-th one also asks for speech. Reported: requests/s, generated tokens/s, p50/p99
time to first text and to first audio (seconds from sending the request). The offline baseline runs
the same requests one by one through ``model.stream`` in the same process (time to first text/audio
event from the call).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .util import write_json

TOPICS = ["the sea", "a boat", "the island", "the wind", "music", "food", "travel", "science", "art", "the sky"]


def make_requests(n, max_tokens, audio_every, talker_tokens):
    out = []
    for i in range(n):
        body = dict(model="bench", messages=[{"role": "user", "content": f"Tell me about {TOPICS[i % 10]}, part {i}."}],
                    max_tokens=max_tokens, temperature=0, seed=i, stream=True, ignore_eos=True)
        if audio_every and i % audio_every == 0:
            body.update(modalities=["text", "audio"], audio={"voice": "Chelsie", "format": "pcm16"},
                        talker_max_new_tokens=talker_tokens, talker_min_new_tokens=talker_tokens)
        out.append(body)
    return out


def one_request(url, body, key):
    import httpx

    t0 = time.perf_counter()
    first_text = first_audio = None
    tokens = 0
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.stream("POST", url + "/v1/chat/completions", json=dict(body, return_token_ids=True), timeout=600,
                      headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:200]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ch = json.loads(line[6:])["choices"]
            if not ch:
                continue
            ids = ch[0].get("token_ids") or []
            tokens += len(ids)
            if ids and first_text is None:
                first_text = time.perf_counter() - t0
            a = ch[0]["delta"].get("audio") or {}
            if a.get("data") and first_audio is None:
                first_audio = time.perf_counter() - t0
    return dict(latency=time.perf_counter() - t0, ttft=first_text, ttfa=first_audio, tokens=tokens)


def summarise(results, wall):
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    ttfa = [r["ttfa"] for r in results if r["ttfa"] is not None]
    pct = lambda xs, q: round(float(np.percentile(xs, q)), 4) if xs else None  # noqa: E731
    return dict(requests=len(results), wall_s=round(wall, 3), requests_per_s=round(len(results) / wall, 3),
                tokens_per_s=round(sum(r["tokens"] for r in results) / wall, 1),
                ttft_p50=pct(ttft, 50), ttft_p99=pct(ttft, 99), ttfa_p50=pct(ttfa, 50), ttfa_p99=pct(ttfa, 99),
                latency_p50=pct([r["latency"] for r in results], 50))


def run_load(url, key, reqs, concurrency, duration):
    stop_at = time.perf_counter() + duration
    it = iter(reqs)
    lock = threading.Lock()
    results = []

    def worker():
        while True:
            with lock:
                if time.perf_counter() > stop_at:
                    return
                body = next(it, None)
            if body is None:
                return
            res = one_request(url, body, key)
            with lock:
                results.append(res)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    return summarise(results, time.perf_counter() - t0)


def run_offline(model, reqs, duration):
    results = []
    t0 = time.perf_counter()
    for body in reqs:
        if time.perf_counter() - t0 > duration:
            break
        kw = dict(max_new_tokens=body["max_tokens"], seed=body["seed"], eos_token_id=[])
        if "audio" in body:
            kw.update(return_audio=True, speaker="Chelsie", talker_do_sample=False,
                      talker_max_new_tokens=body["talker_max_new_tokens"],
                      talker_min_new_tokens=body["talker_min_new_tokens"])
        s = time.perf_counter()
        ft = fa = None
        tokens = 0
        for ev in model.stream(messages=body["messages"], **kw):
            if ev.kind == "text" and ev.token_ids:
                tokens += len(ev.token_ids)
                ft = ft if ft is not None else time.perf_counter() - s
            if ev.kind == "audio" and fa is None:
                fa = time.perf_counter() - s
        results.append(dict(latency=time.perf_counter() - s, ttft=ft, ttfa=fa, tokens=tokens))
    return summarise(results, time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level (at most)")
    p.add_argument("--duration", type=float, default=120.0, help="seconds per level (no new request after)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--audio-every", type=int, default=4, help="every N-th request asks for speech (0: none)")
    p.add_argument("--talker-tokens", type=int, default=40, help="codec ids per spoken reply")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "cpu_serve.json"))
    args = p.parse_args(argv)

    import jax
    import uvicorn

    import omni_jax
    from omni_jax.serve import Engine, ServeLimits, build_app

    path = args.model or omni_jax.default_model_path()
    model = omni_jax.load(path, dtype=args.dtype or ("float32" if args.model is None else "bfloat16"))
    limits = ServeLimits(max_batch=args.max_batch, max_queue=max(64, args.requests), max_tokens=args.max_tokens,
                         max_prompt_tokens=64, max_audio_tokens=max(args.talker_tokens, 1))
    t = time.perf_counter()
    engine = Engine(model, limits)
    engine.precompile()  # one decode program per occupancy bucket: none compiles while timed
    engine.start()
    key = "bench"
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv = uvicorn.Server(uvicorn.Config(build_app(engine, model_name="bench", api_key=key), log_level="warning"))
    th = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    while not srv.started:
        time.sleep(0.05)
    try:
        reqs = make_requests(args.requests, args.max_tokens, args.audio_every, args.talker_tokens)
        warm = make_requests(max(args.concurrency), args.max_tokens, args.audio_every, args.talker_tokens)
        run_load(url, key, warm, max(args.concurrency), 600)  # compile everything once (untimed)
        run_offline(model, warm[:max(1, args.audio_every or 1) + 1], 600)
        warm_s = time.perf_counter() - t
        compiles_warm = engine.compile_counts()
        levels = {}
        for c in args.concurrency:
            levels[str(c)] = run_load(url, key, reqs, c, args.duration)
            print(f"concurrency {c:3d}: {levels[str(c)]}", flush=True)
        offline = run_offline(model, reqs, args.duration * 2)
        print(f"offline one by one: {offline}", flush=True)
        compiles = engine.compile_counts()
        if compiles != compiles_warm:
            print(f"warning: compiled while timed: {compiles_warm} -> {compiles}", flush=True)
        res = dict(command=" ".join(["python -m bench serve"] + list(sys.argv[1:] if argv is None else argv)),
                   device=str(jax.devices()[0].device_kind), backend=jax.default_backend(), jax=jax.__version__,
                   cpu_count=os.cpu_count(), model="embedded default (float32)" if args.model is None else path,
                   date=time.strftime("%Y-%m-%d"), max_tokens=args.max_tokens, audio_every=args.audio_every,
                   talker_tokens=args.talker_tokens, max_batch=args.max_batch, warmup_s=round(warm_s, 1),
                   compiles=compiles, compiled_while_timed=compiles != compiles_warm,
                   decode_buckets={"thinker": sorted(engine.thinker.buckets),
                                   "talker": sorted(engine.talker.buckets) if engine.talker else []},
                   server=levels, offline_one_by_one=offline)
        write_json(args.json, res)
        print(f"wrote {args.json}")
    finally:
        srv.should_exit = True
        th.join(10)
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
