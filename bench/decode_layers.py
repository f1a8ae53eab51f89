"""Decode-step cost of the decoder stack in three layouts, same weights, same token loop:

* ``stacked_scan``: weights and KV cache stacked on a layer axis, one ``lax.scan`` (the checkpoint
  and training layout);
* ``per_layer_stacked_cache``: per-layer weight buffers (a Python loop over
  :func:`omni_jax.layers.unstack_layers`), the KV cache still stacked ``[L, B, S, KVH, D]``;
* ``per_layer``: per-layer weights and per-layer KV cache buffers (what a loaded model runs).

    python -m bench decode_layers                      # the CPU small config's talker and thinker stacks
    python -m bench decode_layers --slots 4096         # a long cache: the cache layout's share
    python -m bench decode_layers --layers 36 --json out.json

Why: a scan slices layer ``l``'s weights out of the stacked arrays with a dynamic slice; on
XLA:CPU that slice is a copy, so every decode step reads each weight, writes it, and reads it
again. A decode step is memory-bound, so this shows up as a fraction of the copy-bandwidth
roofline. Per-layer buffers need no slice; the price is compile time (L layers compiled instead
of one), reported beside the step time. A stacked KV cache has the same problem: each layer's
cache slice is copied per step (its share grows with the cache length).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omni_jax.decoder import DecoderLayers, DecoderShape, init_cache, run_layers
from omni_jax.layers import unstack_layers

from .compare import measure_bandwidth
from .util import write_json


def _stack(name: str, c: dict, layers: int | None) -> dict:
    heads = c["num_attention_heads"]
    return dict(name=name, layers=layers or c["num_hidden_layers"], hidden=c["hidden_size"],
                intermediate=c["intermediate_size"], heads=heads, kv_heads=c["num_key_value_heads"],
                head_dim=c.get("head_dim") or c["hidden_size"] // heads)


def measure(spec: dict, *, steps: int, slots: int, bw: float) -> dict:
    shape = DecoderShape(spec["layers"], spec["heads"], spec["kv_heads"], spec["head_dim"])
    stacked = DecoderLayers(num_layers=spec["layers"], hidden=spec["hidden"], intermediate=spec["intermediate"],
                            heads=spec["heads"], kv_heads=spec["kv_heads"], head_dim=spec["head_dim"], eps=1e-6,
                            dtype=jnp.float32, rngs=nnx.Rngs(0))
    per_layer = unstack_layers(stacked)
    wbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(stacked)))
    hd = spec["head_dim"]
    cos, sin = jnp.ones((1, 1, hd), jnp.float32), jnp.zeros((1, 1, hd), jnp.float32)
    kv_valid = jnp.ones((1, slots), bool)
    h0 = jnp.full((1, 1, spec["hidden"]), 0.1, jnp.float32)
    kvbytes = 2 * spec["layers"] * slots * spec["kv_heads"] * hd * 4  # every step attends over all slots
    out: dict = dict(spec, weight_MB=round(wbytes / 2 ** 20, 1), steps=steps, cache_slots=slots,
                     cache_MB=round(kvbytes / 2 ** 20, 1))
    results = {}
    one = DecoderShape(1, spec["heads"], spec["kv_heads"], spec["head_dim"])

    def layer_step(layer, h, kc, vc, i):
        """One layer at decode step ``i`` over its own cache buffers (what the library runs)."""
        y, c = run_layers([layer], one, h, cos, sin, cache={"k": [kc], "v": [vc]}, start=i, kv_valid=kv_valid)
        return y, c["k"][0], c["v"][0]

    def stacked_cache():
        z = jnp.zeros((spec["layers"], 1, slots, spec["kv_heads"], hd), jnp.float32)
        return {"k": z, "v": z}

    for kind, layers in (("stacked_scan", stacked), ("per_layer_stacked_cache", per_layer), ("per_layer", per_layer)):
        graphdef, state = nnx.split(layers)

        @jax.jit
        def run(state, h, kind=kind, graphdef=graphdef):
            lay = nnx.merge(graphdef, state)

            def body(i, carry):
                h, cache = carry
                if kind == "stacked_scan":  # the checkpoint layout: weights and cache sliced per layer by a scan
                    lgdef, lstate = nnx.split(lay)

                    def scan_body(x, xs):
                        ls, kc, vc = xs
                        y, kc, vc = layer_step(nnx.merge(lgdef, ls), x, kc, vc, i)
                        return y, (kc, vc)

                    y, (k, v) = jax.lax.scan(scan_body, h, (lstate, cache["k"], cache["v"]))
                    cache = {"k": k, "v": v}
                elif kind == "per_layer_stacked_cache":  # per-layer weights, the cache still [L, B, S, KVH, D]
                    y, k, v = h, cache["k"], cache["v"]
                    for li, layer in enumerate(lay):
                        y, kc, vc = layer_step(layer, y, k[li], v[li], i)
                        k, v = k.at[li].set(kc), v.at[li].set(vc)
                    cache = {"k": k, "v": v}
                else:
                    y, cache = run_layers(lay, shape, h, cos, sin, cache=cache, start=i, kv_valid=kv_valid)
                return y * 0.5, cache

            cache = init_cache(shape, 1, slots, jnp.float32) if kind == "per_layer" else stacked_cache()
            return jax.lax.fori_loop(0, steps, body, (h, cache))

        t = time.perf_counter()
        compiled = run.lower(state, h0).compile()
        compile_s = time.perf_counter() - t
        jax.block_until_ready(compiled(state, h0))
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            res = jax.block_until_ready(compiled(state, h0))
            best = min(best, time.perf_counter() - t)
        step = best / steps
        results[kind] = np.asarray(res[0])
        out[kind] = dict(ms_per_step=round(1e3 * step, 3), weight_GBs=round(wbytes / step / 1e9, 2),
                         frac_of_bandwidth_roofline=round((wbytes + kvbytes) / bw / step, 3), compile_s=round(compile_s, 2))
    out["speedup"] = round(out["stacked_scan"]["ms_per_step"] / out["per_layer"]["ms_per_step"], 2)
    out["cache_speedup"] = round(out["per_layer_stacked_cache"]["ms_per_step"] / out["per_layer"]["ms_per_step"], 2)
    out["same_output"] = all(bool(np.allclose(results["stacked_scan"], r, rtol=1e-5, atol=1e-6))
                             for r in results.values())
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench decode_layers")
    p.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "configs", "cpu_small.json"))
    p.add_argument("--layers", type=int, default=None, help="override the depth (compile time grows with it)")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--slots", type=int, default=384, help="KV cache slots")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    with open(args.config) as f:
        cfg = json.load(f)
    bw = measure_bandwidth()
    res = dict(machine=f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}",
               backend=jax.default_backend(), jax=jax.__version__, precision="float32",
               date=time.strftime("%Y-%m-%d"), copy_bandwidth_GBs=round(bw / 1e9, 2), rows=[])
    for name in ("talker", "text"):
        row = measure(_stack(name if name == "talker" else "thinker", cfg[name], args.layers), steps=args.steps,
                      slots=args.slots, bw=bw)
        res["rows"].append(row)
        print(f"{row['name']:8s} {row['layers']} layers x {row['hidden']} wide ({row['weight_MB']} MB, cache {row['cache_MB']} MB): "
              f"stacked scan {row['stacked_scan']['ms_per_step']} ms/step "
              f"({row['stacked_scan']['frac_of_bandwidth_roofline']:.0%} of roofline, compile "
              f"{row['stacked_scan']['compile_s']} s) | per-layer {row['per_layer']['ms_per_step']} ms/step "
              f"({row['per_layer']['frac_of_bandwidth_roofline']:.0%}, compile {row['per_layer']['compile_s']} s) "
              f"| {row['speedup']}x; per-layer weights with a stacked cache "
              f"{row['per_layer_stacked_cache']['ms_per_step']} ms/step (per-layer cache {row['cache_speedup']}x), "
              f"same output: {row['same_output']}", flush=True)
    write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
