"""TAR outer-step cost: ``TAR.outer_step`` under ``trainer.fit`` against the sum of its plain passes, and peak
memory against plain fine-tuning.

One outer step does K adversary steps (forward, backward, optimizer step), K / tr_every tamper-resistance
forward/backwards at the attacked weights, and one retain forward/backward (plus the frozen reference's forward)
and the outer optimizer step. The reference here is a bare loop doing exactly those passes on batches of the same
shapes, with no snapshot/restore, no gradient accumulation, no Lightning. Target: ratio <= 1.2x.

Peak memory is measured in fresh processes (``--measure memory``): plain fine-tuning of the same trained
parameters (AdamW, the same batch) vs TAR outer steps; on CPU the child's own peak RSS (``VmHWM``; not
``ru_maxrss``, which a child inherits from this large parent), checked against ``/usr/bin/time -v``;
``max_memory_allocated`` on CUDA.

    OMP_NUM_THREADS=1 python benchmarks/tar_outer_step.py                 # SmolLM2-135M, top 4 blocks, K = 8
    python benchmarks/tar_outer_step.py --tiny                            # a tiny random Llama (a smoke run)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L
import torch

from benchmarks._common import check_rss, peak_rss_mb, run_fresh, write_json
from datamodules.tar_facts import TamperFactsDataModule
from lightning_modules.nets.split_lm import SplitCausalLM
from lightning_modules.ops import tar as ops
from lightning_modules.tamper import TamperAttack, lm_loss, token_logits, trim
from lightning_modules.tar import TAR

TINY = {"num_hidden_layers": 4, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
        "num_key_value_heads": 1}  # fmt: skip


class StepTimer(L.Callback):
    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t)


def build(args):
    net = SplitCausalLM(random_init=args.tiny, config_overrides=TINY if args.tiny else None,
                        trainable_layers=args.trainable_layers, bos_token="<|endoftext|>")  # fmt: skip
    dm = TamperFactsDataModule(batch_size=args.batch_size, forget_eval_size=8, retain_eval_size=8)
    dm.setup()
    adversary = TamperAttack(name="adv", lr=1e-4, steps=args.k, batch_size=args.batch_size)
    model = TAR(net, [adversary], tr_every=args.tr_every, meta_batch_size=args.batch_size,
                optimizer=lambda p: torch.optim.AdamW(p, lr=1e-5))  # fmt: skip
    return model, dm, adversary


@torch.no_grad()
def warm_trunk_cache(model, dm, device: str) -> None:
    """Run every sentence once so that neither variant pays the one-time trunk computation while timed."""
    model.configure_model()
    model.to(device)
    for split in ("forget_train", "forget_meta", "retain_train"):
        data = dm.sentences(split)
        for start in range(0, len(data), 32):
            ids, mask, _ = trim(*data.__getitems__(list(range(start, min(start + 32, len(data))))))
            model.net(ids.to(device), mask.to(device))


def time_tar(args, model, dm) -> list[float]:
    warm_trunk_cache(model, dm, "cuda" if args.accelerator == "gpu" else "cpu")
    timer = StepTimer()
    trainer = L.Trainer(max_steps=args.steps + 1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[timer], accelerator=args.accelerator)  # fmt: skip
    trainer.fit(model, datamodule=dm)
    return timer.times[1:]  # the first step allocates TAR's buffers and the outer optimizer's state


def time_bare(args, model, dm, adversary) -> list[float]:
    """The same passes as one outer step, back to back, without TAR's bookkeeping."""
    net, ref, gen = model.net, model.reference, torch.Generator().manual_seed(0)
    dev = next(net.parameters()).device
    params = net.trainable_parameters()
    outer = torch.optim.AdamW(params, lr=1e-5)
    weights = ops.inner_step_weights(args.k, args.tr_every, 0.0625)
    times = []
    for _ in range(args.steps):
        batches = [[t.to(dev) for t in dm.sample("forget_train", args.batch_size, gen)] for _ in range(args.k)]
        x_tr = [t.to(dev) for t in dm.sample("forget_meta", args.batch_size, gen)]
        retain = [t.to(dev) for t in dm.sample("retain_train", args.batch_size, gen)]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        inner = adversary.make_optimizer(params)
        for k, b in enumerate(batches):
            inner.zero_grad()
            lm_loss(net, b).backward()
            inner.step()
            if k in weights:
                inner.zero_grad()
                (ops.entropy_loss(token_logits(net, x_tr, model.tr_tokens)) * weights[k]).backward()
        outer.zero_grad()
        ids, mask, _ = trim(*retain)
        h, hidden = net(ids, mask)
        with torch.no_grad():
            _, ref_hidden = ref(ids, mask)
        sel = mask[:, 1:]
        lm = torch.nn.functional.cross_entropy(net.logits(h[:, :-1][sel]).float(), ids[:, 1:][sel])
        (lm + ops.representation_distance(hidden, ref_hidden, mask, model.num_states)).backward()
        outer.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def peak_memory(args) -> float:
    """Peak memory (MB) of ``args.mode`` steps in this process."""
    model, dm, _ = build(args)
    if args.mode == "tar":  # TAR holds the frozen reference copy, the snapshot and the TR-gradient buffers
        model.configure_model()
        if args.accelerator == "gpu":
            model.cuda()
            torch.cuda.reset_peak_memory_stats()
        time_tar(args, model, dm)
    else:  # plain fine-tuning of the same parameters: the model alone, AdamW
        net = model.net
        net.build()
        dev = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
        net.to(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        opt, gen = torch.optim.AdamW(net.trainable_parameters(), lr=1e-5), torch.Generator().manual_seed(0)
        for _ in range((args.steps + 1) * args.k):
            opt.zero_grad()
            lm_loss(net, [t.to(dev) for t in dm.sample("forget_train", args.batch_size, gen)]).backward()
            opt.step()
    if args.accelerator == "gpu":
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2-135M")
    p.add_argument("--trainable-layers", type=int, default=4)
    p.add_argument("--k", type=int, default=8, help="adversary steps per outer step")
    p.add_argument("--tr-every", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="timed outer steps (after one warm-up)")
    p.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--measure", default="all", choices=["all", "time", "memory"])
    p.add_argument("--mode", default="tar", choices=["tar", "finetune"], help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON file or folder (default runs/bench/tar_outer_step[_tiny]_<accelerator>.json)")
    args = p.parse_args(argv)
    if args.accelerator == "cpu":
        torch.set_num_threads(1)
    if args.measure == "memory":
        print(json.dumps({"peak_mb": peak_memory(args)}))
        return 0
    out: dict = {"args": vars(args), "load_before": list(__import__("os").getloadavg())}
    if args.measure in ("all", "time"):
        model, dm, adversary = build(args)
        tar = time_tar(args, model, dm)
        bare = time_bare(args, model, dm, adversary)
        out.update(tar_s=statistics.median(tar), bare_s=statistics.median(bare),
                   ratio=statistics.median(tar) / statistics.median(bare), tar_all=tar, bare_all=bare)
        print(json.dumps({k: out[k] for k in ("tar_s", "bare_s", "ratio", "tar_all", "bare_all")}), flush=True)
    if args.measure == "all":
        base = [sys.executable, __file__, "--measure", "memory", "--trainable-layers", str(args.trainable_layers),
                "--k", str(args.k), "--tr-every", str(args.tr_every), "--batch-size", str(args.batch_size),
                "--steps", str(args.steps), "--accelerator", args.accelerator, *(["--tiny"] if args.tiny else [])]
        for mode in ("finetune", "tar"):
            stdout, time_kib = run_fresh([*base, "--mode", mode])
            out[f"peak_mb_{mode}"] = json.loads(stdout.strip().splitlines()[-1])["peak_mb"]
            if args.accelerator == "cpu":
                out[f"time_v_mb_{mode}"] = time_kib / 1024 if time_kib is not None else None
                out[f"check_{mode}"] = check_rss(out[f"peak_mb_{mode}"], out[f"time_v_mb_{mode}"], mode)
    out["load_after"] = list(__import__("os").getloadavg())
    print("| measure | TAR | reference | ratio |\n|---|---|---|---|")
    if "ratio" in out:
        print(f"| outer step (s), median of {args.steps} | {out['tar_s']:.3f} | {out['bare_s']:.3f} (sum of its passes) "
              f"| {out['ratio']:.3f}x |")
    if "peak_mb_tar" in out:
        print(f"| peak memory (MB) | {out['peak_mb_tar']:.0f} | {out['peak_mb_finetune']:.0f} (plain fine-tuning) | "
              f"{out['peak_mb_tar'] / out['peak_mb_finetune']:.2f}x |")
    for mode in ("finetune", "tar"):
        if f"check_{mode}" in out:
            print(f"peak RSS (MiB) of the fresh child, {out[f'check_{mode}']}")
    print(f"load average before {out['load_before']}, after {out['load_after']}")
    name = f"tar_outer_step{'_tiny' if args.tiny else ''}_{args.accelerator}"
    print(f"wrote {write_json(name, out, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
