"""Does TrojanDam's OOD mapping fit, and what does fitting it cost the main task? (issue 23, deliverable 3)

A centralized probe on a converged federated model (the Chameleon testbed's clean warm-up artifact): for each
injection setting, ``refreshes`` successive rounds of :meth:`lightning_modules.trojandam.TrojanDam.after_aggregation`
with no client training in between (so the main-task cost is the worst case, with no benign repair), printing the
accuracy on the current mapping (``ood_fit``) and the clean test accuracy (MA) after each round's injection. The
federated runs (``python -m recipes.reproduce trojandam``) measure both with benign rounds in between
(``curve/ood_fit_mean``, ``curve/ma_mean_attack``).

    python scripts/probe_trojandam_mapping.py runs/cham30/chameleon/mnist/warmup/seed0/artifact --dataset mnist
"""

from __future__ import annotations

import argparse
import itertools
import time
from types import SimpleNamespace

import torch

from datamodules.federated import FederatedDataModule
from foundation.artifacts import load_artifact
from lightning_modules.nets.cnn import MnistCNN
from lightning_modules.trojandam import TrojanDam


def accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    with torch.no_grad():
        return float(torch.cat([net(x[i : i + 1000]).argmax(-1) for i in range(0, len(y), 1000)]).eq(y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", help="a clean federated warm-up artifact of MnistCNN(width 32, hidden 256)")
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"])
    parser.add_argument("--refreshes", type=int, default=10, help="rounds of injection per setting")
    parser.add_argument("--pool", type=int, nargs="+", default=[128, 800], help="flood-set sizes")
    parser.add_argument("--period", type=int, nargs="+", default=[1, 10], help="rounds per mapping")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 50], help="SGD steps per injection")
    parser.add_argument("--lr", type=float, nargs="+", default=[0.01, 0.05], help="injection learning rates")
    parser.add_argument("--redundant", type=float, default=0.5, help="redundant fraction of each layer")
    args = parser.parse_args()

    dm = FederatedDataModule(dataset=args.dataset, num_clients=100, partition="dirichlet", alpha=0.9, test_size=5000)
    dm.setup()
    x_test, y_test = dm.val_sets[0].tensors
    state = load_artifact(args.artifact).state_dict
    weights = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    print(f"{'pool':>5} {'period':>6} {'steps':>5} {'lr':>6} | ood_fit per round (last) | MA per round (start -> last)")
    for pool, period, steps, lr in itertools.product(args.pool, args.period, args.steps, args.lr):
        net = MnistCNN(num_classes=10, width=32, hidden=256)
        net.load_state_dict(weights)
        start_ma = accuracy(net, x_test, y_test)
        defense = TrojanDam(pool_size=pool, period=period, steps=steps, lr=lr, redundant_fraction=args.redundant)
        fits, mas = [], []
        recipe = SimpleNamespace(net=net, trainer=SimpleNamespace(datamodule=dm), seed=0, last_server_update=None,
                                 log_dict=lambda stats, **_: fits.append(stats["round/ood_fit"]))  # fmt: skip
        began = time.perf_counter()
        for round in range(args.refreshes):
            defense.after_aggregation(recipe, round)
            mas.append(accuracy(net, x_test, y_test))
        seconds = (time.perf_counter() - began) / args.refreshes
        print(f"{pool:>5} {period:>6} {steps:>5} {lr:>6} | " + " ".join(f"{f:.2f}" for f in fits)
              + f" | {start_ma:.4f} -> " + " ".join(f"{m:.3f}" for m in mas) + f" | {seconds:.1f} s/round", flush=True)


if __name__ == "__main__":
    main()
