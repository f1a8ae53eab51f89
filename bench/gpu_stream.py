"""First-audio latency and real-time factor of ``model.stream`` at a published shape with random
weights, on an accelerator:

    python -m bench gpu_stream --preset 3b --json out.json

Thinker and talker in bfloat16, Token2Wav in float32; a 32-token prompt (ids, no tokenizer), 64 text
tokens without EOS, the talker (greedy, kept to codec ids) held to >= 120 of them. One run compiles; the second is measured.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from .util import write_json


def random_full_model(preset: str):
    import jax.numpy as jnp
    from flax import nnx

    import omni_jax
    from bench.util import random_module
    from omni_jax import OmniModel
    from omni_jax.attention import default_impl
    from omni_jax.decoder import to_per_layer
    from omni_jax.talker import Talker
    from omni_jax.thinker import ThinkerLM
    from omni_jax.token2wav import Token2Wav
    from omni_jax.voices import Voice

    if preset == "default":  # the embedded model's shapes (a quick check on CPU)
        from omni_jax.default_model import default_config

        cfg = default_config()
    else:
        cfg = omni_jax.preset(preset)
    dt = jnp.bfloat16
    gdef, state = nnx.split(random_module(lambda: ThinkerLM(cfg.thinker, dtype=dt, rngs=nnx.Rngs(0))))
    talker = nnx.split(random_module(lambda: Talker(cfg.talker, dtype=dt, rngs=nnx.Rngs(1)), seed=1))
    # random weights would also pick the talker's special ids, which are not codes: copy codec 0's head
    # column onto them (greedy argmax breaks the tie towards the lower, valid id; EOS ids stay as drawn)
    k = talker[1]["codec_head"]["kernel"]
    n = cfg.token2wav.dit.num_embeds
    keep = [cfg.talker.tts_codec_end_token_id, cfg.talker.tts_codec_pad_token_id]
    bad = np.asarray([i for i in range(n, cfg.talker.vocab_size) if i not in keep])
    if len(bad):
        k.value = k.value.at[:, bad].set(k.value[:, :1])
    t2w = random_module(lambda: Token2Wav(cfg.token2wav, rngs=nnx.Rngs(2)), seed=2)
    d = cfg.token2wav.dit
    rs = np.random.RandomState(0)
    voices = {"Chelsie": Voice("Chelsie", min(151872, cfg.thinker.text.vocab_size - 1), rs.randn(d.enc_emb_dim).astype(np.float32),
                               rs.randn(300, d.mel_dim).astype(np.float32))}
    gdef, state = to_per_layer(gdef, state, free=True)  # as load() keeps them, without two copies
    talker = to_per_layer(*talker, free=True)
    return OmniModel(cfg, gdef, state, processor=None, dtype=dt, mesh=None, attention=default_impl(),
                     generation_config={"eos_token_id": [], "pad_token_id": 0}, talker=talker, voices=voices,
                     token2wav=t2w)


def main(argv=None) -> int:
    import jax

    from .streaming import stream_figures

    p = argparse.ArgumentParser(prog="python -m bench gpu_stream")
    p.add_argument("--preset", default="3b")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    model = random_full_model(args.preset)
    ids = np.random.RandomState(1).randint(0, min(150000, model.config.thinker.text.vocab_size), (1, 32))
    kw = dict(max_new_tokens=64, return_audio=True, eos_token_id=[], talker_max_new_tokens=200,
              talker_min_new_tokens=120, talker_do_sample=False, talker_repetition_penalty=1.0, speaker="Chelsie")
    t0 = time.perf_counter()
    list(model.stream(ids, **kw))
    compile_s = time.perf_counter() - t0
    ev = list(model.stream(ids, **kw))
    res = dict(preset=args.preset, device=str(jax.devices()[0].device_kind), date=time.strftime("%Y-%m-%d"),
               precision="thinker/talker bfloat16, token2wav float32", first_run_s=round(compile_s, 2),
               **stream_figures(ev), command="python -m bench gpu_stream --preset " + args.preset)
    print(json.dumps(res))
    write_json(args.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
