#!/usr/bin/env python
"""Train the demo model shipped in ``llminstr/demo_model``.

A byte-level GPT-2 (4 layers, width 128, 4 heads, 256 positions) trained on the help
texts that ship with Python (``pydoc_data.topics``), so that nothing has to be
downloaded. Everything is seeded and runs on one CPU thread, so a rerun with the
same Python, torch and transformers versions reproduces the weights.

Usage (from the repository root)::

    python tools/train_demo_model.py                 # writes llminstr/demo_model
    python tools/train_demo_model.py --out /tmp/m --steps 50

Writes ``config.json``, ``model.safetensors`` and ``training.json`` (seed, steps,
hyper-parameters, runtime, final losses in nats/byte, the unigram baseline, versions,
date and command) into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import GPT2LMHeadModel

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from llminstr.demo import (  # noqa: E402
    EOT_ID,
    VALIDATION_FRACTION,
    VOCAB_SIZE,
    corpus_digest,
    corpus_ids,
    corpus_split,
    demo_config,
)

HPARAMS: dict[str, Any] = {
    "batch_size": 32,
    "min_window": 128,
    "max_window": 256,
    "lr": 6e-3,
    "min_lr_ratio": 0.1,
    "warmup_steps": 50,
    "schedule": "linear warmup, then cosine decay to min_lr_ratio * lr",
    "betas": [0.9, 0.95],
    "weight_decay": 0.1,
    "grad_clip": 1.0,
    "eval_window": 256,
    "threads": 1,
}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, steps: int) -> float:
    """Learning rate for 0-based *step*: linear warmup then cosine decay."""
    lr, warm, floor = HPARAMS["lr"], HPARAMS["warmup_steps"], HPARAMS["min_lr_ratio"]
    if step < warm:
        return float(lr * (step + 1) / warm)
    progress = (step - warm) / max(1, steps - warm)
    return float(lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))))


def unigram_baseline(train: torch.Tensor, val: torch.Tensor) -> dict[str, float]:
    """Unigram entropies in nats/byte.

    ``train_entropy``: entropy of the training set's id distribution.
    ``val_cross_entropy``: cross-entropy of the validation ids under the training
    unigram distribution (add-one smoothed) -- the baseline a model must beat.
    """
    counts = torch.bincount(train, minlength=VOCAB_SIZE).double()
    p = counts / counts.sum()
    nz = p[p > 0]
    train_entropy = float(-(nz * nz.log()).sum())
    smoothed = (counts + 1) / (counts.sum() + VOCAB_SIZE)
    val_ce = float(-smoothed.log()[val].mean())
    return {"train_entropy": train_entropy, "val_cross_entropy": val_ce}


@torch.no_grad()
def evaluate(model: GPT2LMHeadModel, ids: torch.Tensor, window: int) -> float:
    """Mean next-id cross-entropy (nats/byte) over non-overlapping windows of *ids*."""
    model.eval()
    total, count = 0.0, 0
    n = (len(ids) - 1) // window
    for start in range(0, n * window, window * 16):
        rows = [
            ids[s : s + window + 1]
            for s in range(start, min(start + window * 16, n * window), window)
        ]
        batch = torch.stack(rows)
        inputs = batch[:, :-1]
        logits = model(inputs, attention_mask=torch.ones_like(inputs)).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += batch[:, 1:].numel()
    model.train()
    return total / count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "llminstr" / "demo_model")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--lr", type=float, default=HPARAMS["lr"], help="peak learning rate")
    args = parser.parse_args(argv)
    HPARAMS["lr"] = args.lr

    torch.set_num_threads(HPARAMS["threads"])
    torch.use_deterministic_algorithms(True)
    seed_everything(args.seed)

    ids = corpus_ids()
    train, val = corpus_split(ids, "train"), corpus_split(ids, "val")
    baseline = unigram_baseline(train, val)
    print(
        f"corpus: {len(ids)} ids ({len(train)} train, {len(val)} val); unigram: "
        f"train entropy {baseline['train_entropy']:.4f}, "
        f"val cross-entropy {baseline['val_cross_entropy']:.4f} nats/byte",
        flush=True,
    )

    config = demo_config()
    model = GPT2LMHeadModel(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": HPARAMS["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=HPARAMS["lr"],
        betas=tuple(HPARAMS["betas"]),
    )
    gen = torch.Generator().manual_seed(args.seed)
    bs, lo, hi = HPARAMS["batch_size"], HPARAMS["min_window"], HPARAMS["max_window"]

    history: list[dict[str, float]] = []
    recent: list[float] = []
    t0 = time.perf_counter()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps)
        length = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        starts = torch.randint(0, len(train) - length - 1, (bs,), generator=gen)
        batch = torch.stack([train[s : s + length + 1] for s in starts.tolist()])
        inputs = batch[:, :-1]
        logits = model(inputs, attention_mask=torch.ones_like(inputs)).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), HPARAMS["grad_clip"])
        opt.step()
        recent.append(float(loss.detach()))
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            val_loss = evaluate(model, val, HPARAMS["eval_window"])
            train_avg = sum(recent) / len(recent)
            recent.clear()
            elapsed = time.perf_counter() - t0
            history.append(
                {
                    "step": step + 1,
                    "train_loss": train_avg,
                    "val_loss": val_loss,
                    "seconds": elapsed,
                }
            )
            print(
                f"step {step + 1:5d}  train {train_avg:.4f}  val {val_loss:.4f}  "
                f"lr {lr_at(step, args.steps):.2e}  {elapsed:.0f}s",
                flush=True,
            )
    train_seconds = time.perf_counter() - t0

    # Final losses on fixed windows: the whole validation part, and the same number of
    # ids from the start of the training part.
    final_val = evaluate(model, val, HPARAMS["eval_window"])
    final_train = evaluate(model, train[: len(val)], HPARAMS["eval_window"])
    print(f"final: train {final_train:.4f}  val {final_val:.4f} nats/byte", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(args.out, safe_serialization=True)
    for name in ("config.json", "model.safetensors"):
        (args.out / name).chmod(0o644)
    gen_cfg = args.out / "generation_config.json"
    if gen_cfg.exists():  # bos/eos/pad live in config.json; keep the folder minimal
        gen_cfg.unlink()

    try:
        out_rel = str(args.out.resolve().relative_to(REPO_ROOT))
    except ValueError:
        out_rel = str(args.out)
    record = {
        "description": "byte-level GPT-2 demo model of llminstr, trained on pydoc_data.topics",
        "command": "python tools/train_demo_model.py "
        + shlex.join(
            [
                "--out",
                out_rel,
                "--steps",
                str(args.steps),
                "--seed",
                str(args.seed),
                "--lr",
                str(args.lr),
            ]
        ),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
        "seed": args.seed,
        "steps": args.steps,
        "hyperparameters": HPARAMS,
        "model": {
            "n_layer": config.n_layer,
            "n_embd": config.n_embd,
            "n_head": config.n_head,
            "n_inner": config.n_inner,
            "n_positions": config.n_positions,
            "vocab_size": config.vocab_size,
            "eot_id": EOT_ID,
            "parameters": n_params,
        },
        "data": {
            "source": "pydoc_data.topics.topics values in sorted key order, UTF-8 bytes, "
            "each followed by the end-of-text id 256",
            "ids": len(ids),
            "train_ids": len(train),
            "val_ids": len(val),
            "validation_fraction": VALIDATION_FRACTION,
            "sha256_uint16le": corpus_digest(ids),
        },
        "runtime_seconds": round(train_seconds, 1),
        "final_train_loss": round(final_train, 4),
        "final_val_loss": round(final_val, 4),
        "loss_unit": "nats/byte (mean next-id cross-entropy, non-overlapping 256-id windows)",
        "unigram_baseline": {k: round(v, 4) for k, v in baseline.items()},
        "history": [{k: round(v, 4) for k, v in h.items()} for h in history],
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
        },
        "platform": platform.platform(),
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
