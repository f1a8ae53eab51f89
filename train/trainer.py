"""The training loop: optax AdamW (warmup + cosine decay, clipping, accumulation), float32 master
weights with bfloat16 compute, per-layer rematerialisation, sharded jitted steps, orbax
checkpoints with exact resume, metrics.jsonl, and the final model in the converted format.

Determinism: the data order is a function of ``--seed`` and the step alone (epoch ``e`` uses the
permutation ``RandomState(seed + e)``; step ``s`` takes the next ``batch_size * grad_accum``
examples of that stream), so a resumed run sees exactly the batches an uninterrupted one would.
A checkpoint holds the trainable parameters, the optimizer state and the data position.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from omni_jax.engine import bucket
from omni_jax.errors import InputError
from omni_jax.sharding import as_auto_mesh, mesh_spec, outside_context_mesh, use_mesh
from omni_jax.training import model_params, train_loss
from omni_jax.validate import check_output_dir

from . import data as D
from .lora import apply_lora, init_lora, lora_axes

MODES = ("full", "thinker", "frozen-encoders", "lora")
RUN_FILE = "run.json"
# options that change the computation: a resumed run must have the same
def _same_setting(name: str, before, now) -> bool:
    """Whether a run's setting is unchanged on ``--resume``: ``--model`` and ``--data`` are the same
    when they name the same file or directory, however spelled (relative, under ``~``, through a link)."""
    if before == now:
        return True
    if name in ("model", "data") and isinstance(before, str) and isinstance(now, str):
        a, b = (os.path.realpath(os.path.expanduser(x)) for x in (before, now))
        return a == b and os.path.exists(a)
    return False


_SAME_ON_RESUME = ("model", "data", "train", "batch_size", "grad_accum", "lr", "warmup_steps", "min_lr_ratio",
                   "weight_decay", "max_grad_norm", "seed", "dtype", "lora_rank", "lora_alpha", "max_length",
                   "talker_weight", "steps", "use_audio_in_video", "on_error")


@dataclasses.dataclass
class Options:
    model: str
    data: str
    out: str
    eval: str | None = None
    resume: bool = False
    steps: int | None = None  # optimizer steps (default: one epoch)
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-5
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    seed: int = 0
    dtype: str = "bfloat16"  # compute dtype; master weights are float32
    remat: bool = True
    train: str = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    save_every: int = 100
    keep: int = 3
    eval_every: int = 0
    max_length: int = 2048
    on_error: str = "fail"
    mesh: Any = None  # a jax.sharding.Mesh (any axis types), a spec like 'data=2,tensor=4', or None
    attention: str | None = None
    talker_weight: float = 1.0
    use_audio_in_video: bool = False
    save_model: bool = True
    progress: bool = True


def _tree_cast(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def micro_step(loss_fn):
    """The accumulating micro-step: ``(trainable, frozen, acc, batch) -> (acc + gradient, loss, aux)``
    for ``loss_fn(trainable, frozen, batch) -> (loss, aux)`` (``acc`` donated: updated in place)."""
    def micro(trainable, frozen, acc, batch):
        (loss, aux), g = jax.value_and_grad(lambda tr: loss_fn(tr, frozen, batch), has_aux=True)(trainable)
        return jax.tree.map(jnp.add, acc, g), loss, aux

    return micro


def apply_update(tx):
    """The optimiser update: ``(trainable, opt_state, grads, loss) -> (trainable, opt_state, grad norm)``.
    A step whose loss or gradient is not finite leaves the state as it was (the run then stops with
    that state checkpointed): one bad batch must not poison the parameters."""
    def apply(trainable, opt_state, grads, loss):
        gn = optax.global_norm(grads)
        updates, new_opt = tx.update(grads, opt_state, trainable)
        new = optax.apply_updates(trainable, updates)
        ok = jnp.isfinite(gn) & jnp.isfinite(loss)
        keep = functools.partial(jax.tree.map, lambda a, b: jnp.where(ok, a, b))
        return keep(new, trainable), keep(new_opt, opt_state), gn

    return apply


def fused_step(loss_fn, tx):
    """A whole optimiser step without accumulation (``--grad-accum 1``): the gradient and the update
    in one program, ``(trainable, frozen, opt_state, batch) -> (trainable, opt_state, loss, aux, grad
    norm)``, so no gradient accumulator (a float32 copy of the trainable parameters) is held."""
    apply = apply_update(tx)

    def step(trainable, frozen, opt_state, batch):
        (loss, aux), g = jax.value_and_grad(lambda tr: loss_fn(tr, frozen, batch), has_aux=True)(trainable)
        new, new_opt, gn = apply(trainable, opt_state, g, loss)
        return new, new_opt, loss, aux, gn

    return step


@outside_context_mesh
class Trainer:
    def __init__(self, opts: Options, log=print):
        import omni_jax
        from flax import nnx

        self.o = o = opts
        self.log = log
        if o.train not in MODES:
            raise InputError(f"--train: one of {', '.join(MODES)}, got '{o.train}'")
        for name in ("batch_size", "grad_accum", "save_every", "keep", "max_length"):
            if getattr(o, name) < 1:
                raise InputError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(o, name)}")
        if o.steps is not None and o.steps < 1:
            raise InputError(f"--steps: must be >= 1, got {o.steps}")
        if o.dtype not in ("bfloat16", "float32"):
            raise InputError(f"--dtype: bfloat16 or float32, got '{o.dtype}'")
        self.compute_dtype = jnp.bfloat16 if o.dtype == "bfloat16" else jnp.float32
        self.mesh = as_auto_mesh(o.mesh)  # the model's and every train program's mesh, with Auto axes
        self._check_run_dir()
        self.model = model = omni_jax.load(o.model, dtype="float32", mesh=self.mesh, attention=o.attention)
        self.config = model.config
        tv = model.config.talker.vocab_size if model.config.talker is not None else None
        records, skipped = D.read_jsonl(o.data, on_error=o.on_error, talker_vocab=tv, voices=model.voices, log=log)
        self.encoder = D.Encoder(model, max_length=o.max_length, use_audio_in_video=o.use_audio_in_video)
        self.examples, skipped2 = self._encode(records, "encode train data")
        self.skipped = skipped + skipped2
        self.eval_examples = []
        if o.eval:
            er, _ = D.read_jsonl(o.eval, on_error=o.on_error, talker_vocab=tv, voices=model.voices, log=log)
            self.eval_examples, _ = self._encode(er, "encode eval data")
        ex = self.examples + self.eval_examples
        self.speech = any(e.codes is not None for e in ex)
        self.talker_length = None
        if self.speech:
            need = max(len(e.codes) + e.reply[0] + 1 for e in ex if e.codes is not None)
            self.talker_length = bucket(need)
        comps = ["thinker"]
        if any("input_features" in e.media for e in ex):
            comps.append("audio")
        if any("pixel_values" in e.media or "pixel_values_videos" in e.media for e in ex):
            comps.append("vision")
        if self.speech:
            comps.append("talker")
        allp = model_params(model)
        missing = [c for c in comps if c not in allp]
        if missing:
            raise InputError(f"{o.model}: the data needs component(s) {', '.join(missing)} the checkpoint lacks")
        params = {c: nnx.to_pure_dict(allp[c]) for c in comps}
        train_comps = {"full": comps, "thinker": ["thinker"],
                       "frozen-encoders": [c for c in comps if c in ("thinker", "talker")], "lora": []}[o.train]
        self.lora_scale = o.lora_alpha / o.lora_rank
        if o.train == "lora":
            lora_comps = [c for c in ("thinker", "talker") if c in comps]
            self.trainable = {"lora": self._place_lora(init_lora(params, lora_comps, o.lora_rank, o.seed))}
            self.frozen = _tree_cast(params, self.compute_dtype)
        else:
            self.trainable = {c: params[c] for c in train_comps}
            self.frozen = _tree_cast({c: params[c] for c in comps if c not in train_comps}, self.compute_dtype)
        n = len(self.examples)
        per_step = o.batch_size * o.grad_accum
        self.steps_per_epoch = max(1, math.ceil(n / per_step))
        self.total_steps = o.steps or self.steps_per_epoch
        self.schedule = optax.warmup_cosine_decay_schedule(
            0.0, o.lr, max(o.warmup_steps, 0), max(self.total_steps, o.warmup_steps + 1), end_value=o.lr * o.min_lr_ratio) \
            if o.warmup_steps else optax.cosine_decay_schedule(o.lr, max(self.total_steps, 1), alpha=o.min_lr_ratio)
        self.tx = optax.chain(optax.clip_by_global_norm(o.max_grad_norm),
                              optax.adamw(self.schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))
        self.opt_state = self._init_opt()
        self.step = 0
        self._jits: dict = {}
        self._apply = self._build_apply()
        self.history: list[dict] = []
        self._write_run_file()

    # ------------------------------------------------------------------------------------
    # set-up
    def _check_run_dir(self):
        o = self.o
        o.out = check_output_dir(o.out, "--out")  # a file there, or an unwritable parent: refused at once
        ck = os.path.join(o.out, "checkpoints")
        has = os.path.isdir(ck) and any(x.isdigit() for x in os.listdir(ck))
        if has and not o.resume:
            raise InputError(f"{o.out}: holds checkpoints of an earlier run; pass --resume to continue it or choose "
                             "a new --out")
        runf = os.path.join(o.out, RUN_FILE)
        if o.resume and os.path.exists(runf):
            with open(runf, encoding="utf-8") as f:
                prev = json.load(f)
            diff = [k for k in _SAME_ON_RESUME if not _same_setting(k, prev.get(k), getattr(o, k))]
            if diff:
                raise InputError(f"--resume: {', '.join('--' + k.replace('_', '-') for k in diff)} differ from the run "
                                 f"in {o.out} ({RUN_FILE})")

    def _write_run_file(self):
        """Create the run directory and its ``run.json`` once the model and data are known good (a bad
        argument leaves nothing behind)."""
        o = self.o
        os.makedirs(o.out, exist_ok=True)
        runf = os.path.join(o.out, RUN_FILE)
        tmp = runf + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            run = {f.name: getattr(o, f.name) for f in dataclasses.fields(o)}
            if not isinstance(o.mesh, (str, dict, type(None))):
                run["mesh"] = mesh_spec(self.mesh)  # a Mesh object is not JSON: its axis sizes
            for k in ("model", "data"):  # absolute, so that a resume from another directory compares them
                v = run.get(k)
                if isinstance(v, str) and os.path.exists(os.path.expanduser(v)):
                    run[k] = os.path.abspath(os.path.expanduser(v))
            json.dump(run, f, indent=1)
        os.replace(tmp, runf)

    def _encode(self, records, desc):
        from tqdm.auto import tqdm

        out, skipped = [], 0
        for r in tqdm(records, desc=desc, disable=not self.o.progress, leave=False):
            try:
                out.append(self.encoder(r))
            except D.DataError as e:
                if self.o.on_error == "fail":
                    raise
                skipped += 1
                self.log(f"warning: {e} (line skipped)")
        if not out:
            raise InputError(f"{desc}: no usable example")
        return out, skipped

    def _place_lora(self, lora):
        if self.mesh is None:
            return lora
        from jax.sharding import NamedSharding

        from omni_jax.sharding import logical_to_spec, put

        out = {}
        for comp, ad in lora.items():
            pre = "" if comp == "thinker" else comp + "/"
            out[comp] = {}
            for key, ab in ad.items():
                ax_a, ax_b = lora_axes(pre + key, ab["a"].ndim)
                out[comp][key] = {
                    "a": put(np.asarray(ab["a"]), NamedSharding(self.mesh, logical_to_spec(ax_a, ab["a"].shape, self.mesh))),
                    "b": put(np.asarray(ab["b"]), NamedSharding(self.mesh, logical_to_spec(ax_b, ab["b"].shape, self.mesh)))}
        return out

    def _replicated(self):
        from jax.sharding import NamedSharding, PartitionSpec

        return NamedSharding(self.mesh, PartitionSpec())

    def _shardings(self, tree):
        from jax.sharding import NamedSharding

        rep = self._replicated()
        return jax.tree.map(lambda x: x.sharding if isinstance(getattr(x, "sharding", None), NamedSharding)
                            and x.sharding.mesh == self.mesh else rep, tree)

    def _init_opt(self):
        state = self.tx.init(self.trainable)
        if self.mesh is None:
            return state
        sh = self._shardings(state)
        return jax.tree.map(lambda x, s: jax.device_put(x, s), state, sh)

    # ------------------------------------------------------------------------------------
    # jitted programs
    def _params(self, trainable, frozen):
        if "lora" in trainable:
            p = apply_lora(frozen, trainable["lora"], self.lora_scale)
        else:
            p = {**frozen, **trainable}
        return _tree_cast(p, self.compute_dtype)

    def _loss_fn(self):
        cfg, o, impl = self.config, self.o, self.model.attention

        def loss(trainable, frozen, batch):
            return train_loss(self._params(trainable, frozen), batch, cfg, impl=impl, remat=o.remat,
                              talker_weight=o.talker_weight)

        return loss

    def _batch_shardings(self, batch):
        from jax.sharding import NamedSharding

        from omni_jax.sharding import logical_to_spec

        b = batch["input_ids"].shape[0]
        out = {}
        for k, v in batch.items():
            names = [None] * np.ndim(v)
            if k in ("position_ids", "talker_position_ids"):
                names[1] = "batch"
            elif np.ndim(v) >= 1 and np.shape(v)[0] == b and (k.startswith(("input_ids", "attention_mask", "labels",
                                                                            "talker_"))):
                names[0] = "batch"
            out[k] = NamedSharding(self.mesh, logical_to_spec(names, np.shape(v), self.mesh))
        return out

    def _micro_jit(self, batch):
        """The jitted micro-step for this batch layout (declared shardings on a mesh)."""
        key = ("micro",) + tuple(sorted((k, np.shape(v)) for k, v in batch.items()))
        if key not in self._jits:
            fn = micro_step(self._loss_fn())
            if self.mesh is None:
                self._jits[key] = (jax.jit(fn, donate_argnums=(2,)), None)
            else:
                tr = self._shardings(self.trainable)
                bs = self._batch_shardings(batch)
                self._jits[key] = (jax.jit(fn, in_shardings=(tr, self._shardings(self.frozen), tr, bs),
                                           out_shardings=(tr, self._replicated(), self._replicated()),
                                           donate_argnums=(2,)), bs)
        return self._jits[key]

    def _step_jit(self, batch):
        """The jitted whole step (gradient and update, no accumulator) for this batch layout."""
        key = ("step",) + tuple(sorted((k, np.shape(v)) for k, v in batch.items()))
        if key not in self._jits:
            fn = fused_step(self._loss_fn(), self.tx)
            if self.mesh is None:
                self._jits[key] = (jax.jit(fn, donate_argnums=(0, 2)), None)
            else:
                tr, os_, rep = self._shardings(self.trainable), self._shardings(self.opt_state), self._replicated()
                bs = self._batch_shardings(batch)
                self._jits[key] = (jax.jit(fn, in_shardings=(tr, self._shardings(self.frozen), os_, bs),
                                           out_shardings=(tr, os_, rep, rep, rep), donate_argnums=(0, 2)), bs)
        return self._jits[key]

    def _eval_jit(self, batch):
        """The loss alone (no gradient) for this batch layout: evaluation."""
        key = ("eval",) + tuple(sorted((k, np.shape(v)) for k, v in batch.items()))
        if key not in self._jits:
            cfg, impl = self.config, self.model.attention

            def fn(trainable, frozen, batch):
                return train_loss(self._params(trainable, frozen), batch, cfg, impl=impl)[1]

            if self.mesh is None:
                self._jits[key] = (jax.jit(fn), None)
            else:
                bs = self._batch_shardings(batch)
                self._jits[key] = (jax.jit(fn, in_shardings=(self._shardings(self.trainable),
                                                             self._shardings(self.frozen), bs),
                                           out_shardings=self._replicated()), bs)
        return self._jits[key]

    def _build_apply(self):
        apply = apply_update(self.tx)
        if self.mesh is None:
            return jax.jit(apply, donate_argnums=(0, 1))
        tr, os_ = self._shardings(self.trainable), self._shardings(self.opt_state)
        rep = self._replicated()
        return jax.jit(apply, in_shardings=(tr, os_, tr, rep), out_shardings=(tr, os_, rep),
                       donate_argnums=(0, 1))

    # ------------------------------------------------------------------------------------
    # set-up
    def _place(self, batch, shardings):
        if shardings is None:
            return batch
        from omni_jax.sharding import put

        return {k: put(v, shardings[k]) for k, v in batch.items()}

    # ------------------------------------------------------------------------------------
    # data
    def step_examples(self, step: int) -> list[list]:
        """The micro-batches (lists of examples) of optimizer step ``step``."""
        o, n = self.o, len(self.examples)
        k = o.batch_size * o.grad_accum
        picks = []
        for g in range(step * k, (step + 1) * k):
            epoch, i = divmod(g, n)
            if getattr(self, "_perm_epoch", None) != epoch:  # one permutation per epoch, not per example
                self._perm, self._perm_epoch = np.random.RandomState(o.seed + epoch).permutation(n), epoch
            picks.append(self.examples[self._perm[i]])
        return [picks[j * o.batch_size:(j + 1) * o.batch_size] for j in range(o.grad_accum)]

    def _collate(self, exs, num_targets, talker_targets):
        return D.collate(self.config, exs, length=self.o.max_length, num_targets=num_targets, speech=self.speech,
                         talker_targets=talker_targets, talker_length=self.talker_length,
                         use_audio_in_video=self.o.use_audio_in_video)

    # ------------------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimizer step (``grad_accum`` micro-batches); returns its metrics."""
        t0 = time.perf_counter()
        micro = self.step_examples(self.step)
        flat = [e for m in micro for e in m]
        nt, ntt = D.targets(flat)
        parts = []  # per micro-batch (loss, aux) on device: read once the step is dispatched
        lr = float(self.schedule(self.step))
        with use_mesh(self.mesh):
            if len(micro) == 1:  # one program: no gradient accumulator
                batch = self._collate(micro[0], nt, ntt)
                fn, bs = self._step_jit(batch)
                self.trainable, self.opt_state, l, aux, gn = fn(self.trainable, self.frozen, self.opt_state,
                                                                self._place(batch, bs))
                parts.append((l, aux))
            else:
                acc = jax.tree.map(jnp.zeros_like, self.trainable)
                for exs in micro:
                    batch = self._collate(exs, nt, ntt)
                    fn, bs = self._micro_jit(batch)
                    acc, l, aux = fn(self.trainable, self.frozen, acc, self._place(batch, bs))
                    parts.append((l, aux))
                total = functools.reduce(jnp.add, [l for l, _ in parts])
                self.trainable, self.opt_state, gn = self._apply(self.trainable, self.opt_state, acc, total)
        loss = sum(float(l) for l, _ in parts)
        if not (math.isfinite(loss) and math.isfinite(float(gn))):
            self._stop_non_finite(loss, float(gn))
        tl = sum(float(a["thinker_loss_sum"]) for _, a in parts)
        tt = sum(float(a.get("talker_loss_sum", 0.0)) for _, a in parts)
        self.step += 1
        dt = time.perf_counter() - t0
        tokens = sum(len(e.ids) for e in flat)
        rec = {"step": self.step, "loss": loss, "thinker_loss": tl / max(nt, 1), "lr": lr, "grad_norm": float(gn),
               "tokens": tokens, "tokens_per_s": tokens / dt, "seconds": dt}
        if self.speech:
            rec["talker_loss"] = tt / max(ntt, 1)
        self.history.append(rec)
        return rec

    def _stop_non_finite(self, loss: float, gn: float):
        """Stop the run at a step whose loss or gradient norm is not finite. The state was left as it was
        before the step (see ``apply``), so it is checkpointed as the last good one and the metrics file
        gets no line for the step (it stays valid JSON lines)."""
        m = self._manager()
        if m.latest_step() != self.step:
            self.save()
        where = os.path.join(self.o.out, "checkpoints", str(self.step))
        raise InputError(f"step {self.step + 1}: the loss is {loss} and the gradient norm {gn} (not finite); "
                         f"training stopped. The last good state (step {self.step}) is in {where}; "
                         "a lower --lr or --max-grad-norm, or the data of this step, may be the cause")

    def evaluate(self) -> float:
        """Mean token loss over the eval set (thinker targets, plus talker targets when present)."""
        exs = self.eval_examples
        tot = n = 0.0
        with use_mesh(self.mesh):
            for i in range(0, len(exs), self.o.batch_size):
                chunk = exs[i:i + self.o.batch_size]
                nt, ntt = D.targets(chunk)
                batch = self._collate(chunk, 1.0, 1.0)
                fn, bs = self._eval_jit(batch)
                aux = fn(self.trainable, self.frozen, self._place(batch, bs))
                tot += float(aux["thinker_loss_sum"]) + float(aux.get("talker_loss_sum", 0.0))
                n += nt + ntt
        return tot / max(n, 1.0)

    # ------------------------------------------------------------------------------------
    # checkpoints
    def _manager(self):
        import orbax.checkpoint as ocp

        if not hasattr(self, "_mngr"):
            self._mngr = ocp.CheckpointManager(
                os.path.abspath(os.path.join(self.o.out, "checkpoints")),
                options=ocp.CheckpointManagerOptions(max_to_keep=self.o.keep, create=True,
                                                     enable_async_checkpointing=False),
                item_names=("state", "meta"))
        return self._mngr

    def save(self):
        import orbax.checkpoint as ocp

        n, per = len(self.examples), self.o.batch_size * self.o.grad_accum
        meta = {"step": self.step, "epoch": (self.step * per) // n, "cursor": (self.step * per) % n,
                "seed": self.o.seed, "rng": {"data_order": "RandomState(seed + epoch)", "seed": self.o.seed},
                "examples": n}
        m = self._manager()
        m.save(self.step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"trainable": self.trainable, "opt_state": self.opt_state}),
            meta=ocp.args.JsonSave(meta)))
        m.wait_until_finished()

    def restore_latest(self) -> int | None:
        import orbax.checkpoint as ocp

        m = self._manager()
        steps = sorted(m.all_steps(), reverse=True)
        if not steps:
            return None
        target = {"trainable": self.trainable, "opt_state": self.opt_state}
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
        got, unusable = None, []
        for step in steps:  # the newest complete checkpoint that restores; a damaged one is named and skipped
            try:
                got = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                              meta=ocp.args.JsonRestore()))
                break
            except Exception as e:  # orbax/tensorstore raise many types for damaged files
                msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                where = os.path.join(self.o.out, "checkpoints", str(step))
                unusable.append(where)
                self.log(f"warning: checkpoint {where} is unusable ({type(e).__name__}: {msg})"
                         + ("; trying an older one" if step != steps[-1] else ""))
        if got is None:
            raise InputError(f"--resume: no usable checkpoint in {os.path.join(self.o.out, 'checkpoints')} "
                             f"({', '.join(unusable)} could not be restored); start a new run with another --out")
        self.trainable = got["state"]["trainable"]
        self.opt_state = got["state"]["opt_state"]
        if got["meta"]["examples"] != len(self.examples):
            raise InputError(f"--resume: the checkpoint was made with {got['meta']['examples']} training examples, "
                             f"the data now gives {len(self.examples)}")
        self.step = int(got["meta"]["step"])
        return self.step

    # ------------------------------------------------------------------------------------
    def merged_params(self) -> dict:
        """Float32 parameters of every trained or used component, LoRA merged."""
        if "lora" in self.trainable:
            from flax import nnx

            base = {c: nnx.to_pure_dict(p) for c, p in model_params(self.model).items() if c in self.frozen}
            return apply_lora(base, self.trainable["lora"], self.lora_scale)
        return dict(self.trainable)

    def run(self) -> dict:
        """Train to ``total_steps`` (resuming if asked), logging metrics and saving checkpoints."""
        from tqdm.auto import tqdm

        o = self.o
        metrics_path = os.path.join(o.out, "metrics.jsonl")
        if o.resume:
            got = self.restore_latest()
            if got is not None:
                self.log(f"resumed from step {got} ({os.path.join(o.out, 'checkpoints', str(got))})")
            _truncate_metrics(metrics_path, self.step)
        elif os.path.exists(metrics_path):
            os.remove(metrics_path)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", disable=not o.progress)
        with open(metrics_path, "a", encoding="utf-8") as mf:
            while self.step < self.total_steps:
                rec = self.train_step()
                if o.eval_every and self.eval_examples and self.step % o.eval_every == 0:
                    rec["eval_loss"] = self.evaluate()
                mf.write(json.dumps(rec) + "\n")
                mf.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}", lr=f"{rec['lr']:.2e}")
                if self.step % o.save_every == 0 or self.step == self.total_steps:
                    self.save()
        bar.close()
        summary = {"steps": self.step, "skipped_lines": self.skipped}
        if self.eval_examples:
            summary["eval_loss"] = self.evaluate()
        if o.save_model:
            from .export import write_model

            path = os.path.join(o.out, "model")
            write_model(self.model, self.merged_params(), path, progress=o.progress)
            summary["model"] = path
        return summary


def _truncate_metrics(path: str, step: int) -> None:
    """Keep the metrics of steps <= ``step`` (the resumed checkpoint's): later lines are redone."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut by the kill
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(tmp, path)
