"""Target-vector optimisation of MEMIT / NAMET: batched (ours) against one request at a time (the reference's way).

The same requests, model and hyperparameters (read from ``configs/namet/smollm2_<method>.yaml``) go through
``compute_targets`` three ways, interleaved over repetitions so the drift of a shared machine hits all alike:

- ``batched``: ``v_batch_size`` requests optimised together, prefix tokens run once into a KV cache (the recipe);
- ``sequential+cache``: one request at a time, with the prefix cache (isolates the batching);
- ``reference``: one request at a time on full sequences at every step, as ``memit/compute_z.py`` does.

It prints the time per edit, the speed-ups and each variant's distance to the reference, and asserts that the
three agree in float32: within ``FLOAT32_TOL`` (relative; different summation orders of batched matmuls and the
KV cache leave ~2e-5, a wrong target is O(1)). With a bfloat16 compute dtype (the configs' default) the timed
variants differ by the bf16 rounding amplified over the optimisation steps (~5e-2 relative); that drift is
reported, not asserted, and the float32 agreement is asserted on the first ``--check-edits`` requests in the
same process. A second part times the second-moment statistics of the edited layers (one pass over
``stats_tokens`` corpus tokens) in a fresh process and reports its own peak RSS (``VmHWM``) with the model loaded
and after the statistics, checked against ``/usr/bin/time -v``.

    OMP_NUM_THREADS=1 python benchmarks/namet_targets.py --method memit --edits 32 --repeats 1
    python benchmarks/namet_targets.py --edits 4 --dtype float32 --stats-tokens 2000 --out /tmp/bench   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import check_rss, peak_rss_mb, run_fresh, write_json  # noqa: E402

FLOAT32_TOL = 1e-4  # max ‖δ - δ_ref‖ / mean ‖δ‖ allowed between the variants in float32


def relative_diffs(out: dict, ref: str = "reference") -> dict[str, float]:
    """max over requests of ‖δ - δ_ref‖, over the mean ‖δ_ref‖, per variant."""
    scale = out[ref].norm(dim=-1).mean()
    return {k: float((v - out[ref]).norm(dim=-1).max() / scale) for k, v in out.items()}


def assert_float32_agreement(diffs: dict[str, float], edits: int) -> None:
    bad = {k: d for k, d in diffs.items() if not d <= FLOAT32_TOL}
    if bad:
        raise AssertionError(f"float32 target vectors of {edits} requests differ from the one-at-a-time reference: "
                             f"{bad} (relative) > {FLOAT32_TOL}")


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
    parser.add_argument("--check-edits", type=int, default=4,
                        help="requests of the float32 agreement check when the compute dtype is bfloat16")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file or folder (default runs/bench/namet_targets_<method>_<dtype>.json)")
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
            print(f"repeat {rep + 1}/{args.repeats}: {name} {times[name][-1]:.0f} s", flush=True)
    diffs = relative_diffs(out)
    dtype = m.hparams.compute_dtype
    if dtype == "float32":
        diffs32, edits32 = diffs, len(records)
    else:  # the bf16 drift is reported below; agreement is asserted in float32 on a few requests
        m.hparams.compute_dtype, edits32, out32 = "float32", min(args.check_edits, len(records)), {}
        for name in names:
            m.hparams.update(variants[name])
            with torch.enable_grad():
                out32[name] = m.compute_targets(records[:edits32])[0]
        m.hparams.compute_dtype = dtype
        diffs32 = relative_diffs(out32)
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
    if dtype != "float32":
        print(f"\n{dtype} drift of the variants above (reported, not asserted); float32 on {edits32} requests: "
              + ", ".join(f"{k} {v:.1e}" for k, v in diffs32.items()))
    assert_float32_agreement(diffs32, edits32)
    print(f"float32 agreement of the three variants within {FLOAT32_TOL:.0e}: OK ({edits32} requests)")

    # statistics in a fresh process, so its peak memory is its own (VmHWM), checked by /usr/bin/time -v
    cmd = [sys.executable, __file__, "--method", args.method, "--stats-only", "--stats-tokens", str(args.stats_tokens)]
    stdout, time_kib = run_fresh(cmd)
    stats = json.loads(stdout.strip().splitlines()[-1])
    stats["time_v_mb"] = time_kib / 1024 if time_kib is not None else None
    print(f"\nstatistics of layers {stats['layers']} over {args.stats_tokens} tokens of {stats['corpus']}: "
          f"{stats['seconds']:.1f} s ({args.stats_tokens / stats['seconds']:.0f} tokens/s); peak RSS "
          f"{stats['rss_model_mb']:.0f} MiB with the model loaded, {stats['rss_peak_mb']:.0f} MiB after the statistics")
    print("peak RSS of the statistics process, " + check_rss(stats["rss_peak_mb"], stats["time_v_mb"], "statistics"))
    record = {"method": args.method, "edits": len(records), "dtype": dtype, "times": times, "diffs": diffs,
              "float32_check": {"edits": edits32, "diffs": diffs32, "tolerance": FLOAT32_TOL}, "stats": stats,
              "peak_rss_mb_this_process": peak_rss_mb(), "load": [load, os.getloadavg()]}  # fmt: skip
    print(f"wrote {write_json(f'namet_targets_{args.method}_{dtype}', record, args.out)}")
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
