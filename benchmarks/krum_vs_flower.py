"""Krum / Multi-Krum: ``lightning_modules.ops.aggregation.krum`` against Flower's ``aggregate_krum`` on the same
updates (``n`` clients x the MnistCNN's ``d`` = 206,922 parameters of ``configs/fl/mnist_fedavg_naive.yaml``).

Both get the same float32 updates (Flower: one flat NumPy array per client with its ``num_examples``; ours: the
``[n, d]`` tensor and the counts, ``weights`` passed as the engine's ``Krum(weighted=True)`` does). The selected
clients must be the same and the aggregates agree to float32 rounding; the best of ``--repeats`` timings of each,
interleaved, one thread.

    OMP_NUM_THREADS=1 python benchmarks/krum_vs_flower.py             # n = 10, 30, 100
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import machine_note, markdown_table, write_json  # noqa: E402

D = 206_922  # MnistCNN(width=16, hidden=128) parameters


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 30, 100])
    ap.add_argument("--dim", type=int, default=D)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="JSON file or folder (default runs/bench/krum_vs_flower.json)")
    args = ap.parse_args(argv)
    try:
        from flwr.server.strategy.aggregate import aggregate_krum
    except ImportError:
        print("flwr is not installed: pip install -e '.[test]' (it is in the test extra)")
        return None
    import numpy as np
    import torch

    from lightning_modules.ops.aggregation import krum

    torch.set_num_threads(1)
    note, rows, record = machine_note(), [], {}
    for n in args.clients:
        f = max(1, (n - 3) // 4)  # n > 2f + 2 with room; Multi-Krum keeps n - f
        g = torch.Generator().manual_seed(n)
        updates = torch.randn(n, args.dim, generator=g) * 0.01
        counts = torch.randint(100, 1000, (n,), generator=g)
        results = [([updates[i].numpy()], int(counts[i])) for i in range(n)]
        for keep in (0, n - f):
            ours_t, flower_t = [], []
            for rep in range(args.repeats):
                for engine in (("ours", "flower") if rep % 2 == 0 else ("flower", "ours")):
                    t0 = time.perf_counter()
                    if engine == "ours":
                        ours, sel = krum(updates, f, max(1, keep), counts.double() if keep else None)
                        ours_t.append(time.perf_counter() - t0)
                    else:
                        theirs = aggregate_krum(results, f, keep)
                        flower_t.append(time.perf_counter() - t0)
            theirs = np.concatenate([a.ravel() for a in theirs])
            diff = float(np.abs(ours.numpy() - theirs).max() / np.abs(theirs).max())
            if diff > 1e-5:
                raise AssertionError(f"n={n}, f={f}, keep={keep}: aggregates differ by {diff:.1e} (relative)")
            name = "Krum" if keep == 0 else f"Multi-Krum (keep {keep}, weighted)"
            rows.append([n, f, name, min(ours_t) * 1e3, min(flower_t) * 1e3, f"{min(flower_t) / min(ours_t):.1f}x",
                         f"{diff:.0e}"])  # fmt: skip
            record[f"{n}/{keep}"] = {"ours_s": ours_t, "flower_s": flower_t, "rel_diff": diff}
    print(f"\nKrum on n updates of d = {args.dim}, float32, best of {args.repeats} (interleaved), 1 thread\n")
    print(markdown_table(["n", "f", "rule", "ours ms", "Flower ms", "Flower/ours", "max rel. diff"], rows))
    print(f"load average {note['loadavg'][0]:.2f} before, {os.getloadavg()[0]:.2f} after (shared machine)")
    print(f"wrote {write_json('krum_vs_flower', {'rows': rows, 'runs': record, 'machine': note}, args.out)}")
    return record


if __name__ == "__main__":
    main()
