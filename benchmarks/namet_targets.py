"""Target-vector optimisation of MEMIT / NAMET: batched (ours) against one request at a time (the reference's way).

The same requests, model and hyperparameters (read from ``configs/namet/smollm2_<method>.yaml``) go through
``compute_targets`` three ways, interleaved over repetitions so the drift of a shared machine hits all alike:

- ``batched``: ``v_batch_size`` requests optimised together, prefix tokens run once into a KV cache (the recipe);
- ``sequential+cache``: one request at a time, with the prefix cache (isolates the batching);
- ``reference``: one request at a time on full sequences at every step, as ``memit/compute_z.py`` does.

It asserts that the three give the same target vectors (to the compute dtype's precision) and prints the time
per edit and the speed-ups. A second part times the second-moment statistics of the edited layers (one pass over
``stats_tokens`` corpus tokens) and reports the process's peak memory before and after.

    OMP_NUM_THREADS=1 python benchmarks/namet_targets.py --method memit --edits 32 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(method: str, **overrides):
    import yaml

    from lightning_modules import MEMIT, NAMET, CausalLM

    cfg = yaml.safe_load((ROOT / "configs" / "namet" / f"smollm2_{method}.yaml").read_text())
    args = dict(cfg["model"]["init_args"])
    net = CausalLM(**args.pop("model")["init_args"])
    args.update(overrides)
    module = {"memit": MEMIT, "namet": NAMET}[method](net, **args)
    module.configure_model()
    return module, cfg["data"]["init_args"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=["memit", "namet"], default="memit")
    parser.add_argument("--edits", type=int, default=32, help="requests whose target vectors are optimised")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--stats-tokens", type=int, default=20_000, help="corpus tokens of the statistics part")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="compute dtype (default: the config's)")
    parser.add_argument("--stats-only", action="store_true", help="only the statistics part (run in a fresh process)")
    args = parser.parse_args(argv)
    if args.stats_only:
        return stats_part(args)

    import torch

    from datamodules import CounterFactDataModule
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.manual_seed(args.seed)
    load = os.getloadavg()
    m, data = build(args.method, **({"compute_dtype": args.dtype} if args.dtype else {}))
    m.prepare()
    dm = CounterFactDataModule(num_edits=args.edits, relations=data.get("relations"), seed=args.seed)
    dm.select_known(m.knows)
    records = dm.records
    variants = {
        "batched": {"v_batch_size": m.hparams.v_batch_size, "prefix_cache": True},
        "sequential+cache": {"v_batch_size": 1, "prefix_cache": True},
        "reference": {"v_batch_size": 1, "prefix_cache": False},
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    out: dict[str, torch.Tensor] = {}
    names = list(variants)
    for rep in range(args.repeats):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            m.hparams.update(variants[name])
            start = time.perf_counter()
            with torch.enable_grad():
                delta, _, _ = m.compute_targets(records)
            times[name].append(time.perf_counter() - start)
            out[name] = delta
    scale = out["batched"].norm(dim=-1).mean()
    diffs = {k: float((v - out["reference"]).norm(dim=-1).max() / scale) for k, v in out.items()}
    rows = []
    for name in names:
        best = min(times[name])
        rows.append((name, best / len(records), min(times["reference"]) / best, diffs[name]))
    print(f"\n{args.method.upper()} target vectors, {len(records)} SmolLM2-135M requests, {m.hparams.compute_dtype}, "
          f"{torch.get_num_threads()} thread(s); load average {load[0]:.1f} -> {os.getloadavg()[0]:.1f}\n")
    print("| variant | s / edit | speed-up vs reference | max ‖δ - δ_ref‖ / mean ‖δ‖ |")
    print("|---|---|---|---|")
    for name, per, speed, diff in rows:
        print(f"| {name} | {per:.2f} | {speed:.2f}x | {diff:.1e} |")

    # statistics in a fresh process, so its peak memory is its own
    import subprocess

    cmd = [sys.executable, __file__, "--method", args.method, "--stats-only", "--stats-tokens", str(args.stats_tokens)]
    stats = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    print(f"\nstatistics of layers {stats['layers']} over {args.stats_tokens} tokens of {stats['corpus']}: "
          f"{stats['seconds']:.1f} s ({args.stats_tokens / stats['seconds']:.0f} tokens/s); peak RSS "
          f"{stats['rss_model_mb']:.0f} MB with the model loaded, {stats['rss_peak_mb']:.0f} MB after the statistics")
    record = {"method": args.method, "edits": len(records), "dtype": m.hparams.compute_dtype, "times": times,
              "diffs": diffs, "stats": stats, "peak_rss_mb": peak_rss_mb(), "load": [load, os.getloadavg()]}
    out_dir = ROOT / "runs" / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"namet_targets_{args.method}_{m.hparams.compute_dtype}.json").write_text(json.dumps(record, indent=2))
    return 0


def stats_part(args) -> int:
    """Time one statistics pass (not read from the cache) and print a JSON line with time and peak RSS."""
    import torch

    from lightning_modules.editing_stats import compute_second_moments

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    m, _ = build(args.method)
    rss_model = peak_rss_mb()
    paths = [m.hparams.rewrite_module_tmp.format(layer) for layer in m.layers]
    start = time.perf_counter()
    compute_second_moments(m.net, paths, m.hparams.stats_corpus, args.stats_tokens, m.hparams.stats_seq_len,
                           m.hparams.token_budget, m._autocast)
    secs = time.perf_counter() - start
    print(json.dumps({"layers": m.layers, "corpus": m.hparams.stats_corpus, "seconds": secs,
                      "rss_model_mb": rss_model, "rss_peak_mb": peak_rss_mb()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
