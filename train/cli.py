"""``omni-jax train`` and ``python -m train`` (the same flags)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from omni_jax.validate import finite_float

from .trainer import MODES, Options


def add_arguments(p: argparse.ArgumentParser) -> None:

    d = Options(model="", data="", out="")
    p.add_argument("--model", required=True, help="checkpoint directory (Hugging Face or converted)")
    p.add_argument("--data", required=True, help="training conversations, JSONL (see train/data.py)")
    p.add_argument("--eval", default=None, help="evaluation conversations, JSONL")
    p.add_argument("--out", required=True, help="run directory: checkpoints/, metrics.jsonl, model/")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: one epoch)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="conversations per micro-batch")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=finite_float, default=d.lr, help="peak learning rate (AdamW)")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warmup, then cosine decay")
    p.add_argument("--min-lr-ratio", type=finite_float, default=d.min_lr_ratio, help="final lr as a fraction of --lr")
    p.add_argument("--weight-decay", type=finite_float, default=d.weight_decay)
    p.add_argument("--max-grad-norm", type=finite_float, default=d.max_grad_norm, help="global-norm gradient clipping")
    p.add_argument("--seed", type=int, default=d.seed, help="data order and LoRA initialisation")
    p.add_argument("--dtype", default=d.dtype, choices=["bfloat16", "float32"],
                   help="compute dtype (master weights and optimizer state are float32)")
    p.add_argument("--no-remat", dest="remat", action="store_false", help="keep activations instead of "
                   "recomputing each layer in the backward pass")
    p.add_argument("--train", default=d.train, choices=MODES,
                   help="what trains: everything the data uses, the thinker LM only, all but the encoders, "
                        "or LoRA adapters on the decoders' attention and MLP")
    # flags that only matter with another flag default to "not given" (argparse.SUPPRESS), so that
    # run_train can refuse them where they would be ignored; Options supplies the defaults
    p.add_argument("--lora-rank", type=int, default=argparse.SUPPRESS,
                   help=f"adapter rank (default {d.lora_rank}); with --train lora")
    p.add_argument("--lora-alpha", type=finite_float, default=argparse.SUPPRESS,
                   help=f"adapter scale numerator (default {d.lora_alpha}); with --train lora")
    p.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps")
    p.add_argument("--keep", type=int, default=d.keep, help="checkpoints kept (the newest)")
    p.add_argument("--eval-every", type=int, default=argparse.SUPPRESS,
                   help="evaluate every N steps (default 0: at the end); with --eval")
    p.add_argument("--max-length", type=int, default=d.max_length,
                   help="tokens per conversation (batches are padded to it: one compiled step)")
    p.add_argument("--on-error", default=d.on_error, choices=["fail", "skip"],
                   help="a bad data line stops the run (fail) or is reported and skipped")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. fsdp=8 or data=2,tensor=4")
    p.add_argument("--attention", default=None, choices=["xla", "pallas"])
    p.add_argument("--talker-weight", type=finite_float, default=d.talker_weight, help="weight of the talker's loss")
    p.add_argument("--use-audio-in-video", action="store_true")
    p.add_argument("--no-save-model", dest="save_model", action="store_false",
                   help="skip writing RUN_DIR/model at the end")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def run_train(args) -> int:
    from omni_jax.errors import InputError

    from .trainer import Trainer

    given = vars(args)
    for flag, needs, ok in (("lora_rank", "--train lora", args.train == "lora"),
                            ("lora_alpha", "--train lora", args.train == "lora"),
                            ("eval_every", "--eval", args.eval is not None)):
        if flag in given and not ok:
            raise InputError(f"--{flag.replace('_', '-')} needs {needs} (it would be ignored)")

    fields = {f.name for f in dataclasses.fields(Options)}
    opts = Options(**{k: v for k, v in vars(args).items() if k in fields})
    summary = Trainer(opts, log=lambda m: print(m, file=sys.stderr)).run()
    msg = f"trained {summary['steps']} steps"
    if summary.get("skipped_lines"):
        msg += f"; {summary['skipped_lines']} data line(s) skipped"
    if "eval_loss" in summary:
        msg += f"; eval loss {summary['eval_loss']:.4f}"
    if "model" in summary:
        msg += f"; model: {summary['model']} (omni_jax.load it, or `omni-jax export` it to Hugging Face)"
    print(msg, file=sys.stderr)
    return 0


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser("train", help="fine-tune on JSONL conversations (SFT of thinker and talker)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    add_arguments(p)
    p.set_defaults(func=run_train)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train", description="fine-tune omni-jax models")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    add_arguments(p)
    p.set_defaults(func=run_train)
    return p


def main(argv=None) -> int:
    from omni_jax.cli import run

    return run(build_parser(), argv)
