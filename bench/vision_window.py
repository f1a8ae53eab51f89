"""The vision encoder's window attention on the XLA path, computed block by block (a band of one
window's length either side of each block, :func:`omni_jax.attention.xla_band_attention`) against
the dense segment-masked formulation it replaced, same weights and image, one process.

    python -m bench vision_window                      # 448x448 and 1288x728 images, 4 of 32 blocks
    python -m bench vision_window --sizes 644x476 --depth 8 --json out.json

Published vision widths (1280 wide, 16 heads, MLP 3420, 112-pixel windows) with ``--depth`` blocks
(the last one full attention, as every 8th block of the published 32), random weights, float32 on
the default backend. Reports the encoder's time per image both ways and the largest difference of
the outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .util import band_attention, write_json


def main(argv=None):
    from omni_jax import preset
    from omni_jax.vision import VisionEncoder, encode_vision

    p = argparse.ArgumentParser(prog="python -m bench vision_window")
    p.add_argument("--sizes", nargs="+", default=["448x448", "1288x728"], help="image sizes WxH in pixels "
                   "(multiples of 28)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cfg = preset("3b").thinker.vision
    cfg = dataclasses.replace(cfg, depth=args.depth, fullatt_block_indexes=(args.depth - 1,))
    model = VisionEncoder(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    width = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    res = dict(machine=f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}",
               backend=jax.default_backend(), jax=jax.__version__, precision="float32",
               date=time.strftime("%Y-%m-%d"), depth=args.depth, rows=[])
    for size in args.sizes:
        try:
            w, h = (int(x) for x in size.lower().split("x"))
        except ValueError:
            p.error(f"--sizes {size}: expected WxH, e.g. 448x448")
        if w % 28 or h % 28 or w <= 0 or h <= 0:
            p.error(f"--sizes {size}: width and height must be positive multiples of 28")
        grid = np.asarray([[1, h // cfg.patch_size, w // cfg.patch_size]])
        n = int(grid.prod())
        pv = np.random.default_rng(0).standard_normal((n, width)).astype(np.float32)
        row: dict = dict(size=size, patches=n)
        outs = {}
        for kind in ("band", "dense"):
            with band_attention(kind == "band"):
                t = time.perf_counter()
                outs[kind] = np.asarray(encode_vision(model, cfg, pv, grid, "xla"))
                first = time.perf_counter() - t
                best = float("inf")
                for _ in range(2):
                    t = time.perf_counter()
                    jax.block_until_ready(encode_vision(model, cfg, pv, grid, "xla"))
                    best = min(best, time.perf_counter() - t)
            row[kind] = dict(s=round(best, 3), compile_s=round(first - best, 2))
        row["speedup"] = round(row["dense"]["s"] / row["band"]["s"], 2)
        row["max_abs_diff"] = float(np.abs(outs["band"] - outs["dense"]).max())
        res["rows"].append(row)
        print(f"{size} ({n} patches, {args.depth} blocks): band {row['band']['s']} s, dense {row['dense']['s']} s "
              f"-> {row['speedup']}x; max abs diff {row['max_abs_diff']:.1e}", flush=True)
    write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
