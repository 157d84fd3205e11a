"""Shared pieces of the benchmarks: the federated experiment read from its config, the same seeds as the engine,
peak memory of fresh processes (checked by ``/usr/bin/time -v``), machine-load notes, a markdown table and the
JSON record (``runs/bench/`` unless ``--out``).

Imported by ``benchmarks/fl_*.py`` after they put the repository root on ``sys.path``; nothing here times
anything by itself.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "fl" / "mnist_fedavg_naive.yaml"
OUT_DIR = ROOT / "runs" / "bench"


@dataclass(frozen=True)
class FLJob:
    """The federated job every benchmark runs, read from ``configs/fl/mnist_fedavg_naive.yaml``.

    The attack is left out (benign FedAvg rounds, the config's clean baseline ``attack=null``): the rounds
    timed here come before the config's attack window anyway, and the bare loop and Flower have no attack.
    """

    dataset: str
    num_clients: int
    partition: str
    alpha: float
    clients_per_round: int
    server_lr: float
    lr: float
    momentum: float
    weight_decay: float
    local_epochs: int
    batch_size: int
    width: int
    hidden: int
    num_classes: int
    rounds_per_epoch: int
    seed: int
    max_local_steps: int | None = None  # LocalTrainer.max_steps (None: full local epochs, as the config)

    @classmethod
    def from_config(cls, path: Path = DEFAULT_CONFIG, **overrides: Any) -> FLJob:
        import yaml

        cfg = yaml.safe_load(Path(path).read_text())
        model, data = cfg["model"]["init_args"], cfg["data"]["init_args"]
        local, net = model["local"]["init_args"], model["net"]["init_args"]
        if model.get("aggregator", {}).get("class_path", "FedAvg").rsplit(".", 1)[-1] != "FedAvg":
            raise ValueError(f"{path}: the benchmarks compare FedAvg rounds; the config's aggregator is not FedAvg")
        job = {
            "dataset": data.get("dataset", "mnist"), "num_clients": data["num_clients"],
            "partition": data["partition"], "alpha": float(data.get("alpha", 0.5)),
            "clients_per_round": model["clients_per_round"], "server_lr": float(model.get("server_lr", 1.0)),
            "lr": float(local["lr"]), "momentum": float(local["momentum"]),
            "weight_decay": float(local["weight_decay"]), "local_epochs": int(local["local_epochs"]),
            "batch_size": int(local["batch_size"]), "width": int(net.get("width", 16)),
            "hidden": int(net.get("hidden", 128)), "num_classes": int(net.get("num_classes", 10)),
            "rounds_per_epoch": int(data.get("rounds_per_epoch", 5)), "seed": int(cfg.get("seed_everything", 0)),
        }  # fmt: skip
        job.update(overrides)
        return cls(**job)

    # ------------------------------------------------------------------ the engine's objects for this job
    def datamodule(self, num_clients: int | None = None, poisoning: Any = None):
        from datamodules.federated import FederatedDataModule

        return FederatedDataModule(
            dataset=self.dataset, num_clients=num_clients or self.num_clients, partition=self.partition,
            alpha=self.alpha, rounds_per_epoch=self.rounds_per_epoch, poisoning=poisoning, seed=self.seed,
        )  # fmt: skip

    def net(self):
        """The initial global model: ``MnistCNN`` initialised under ``torch.manual_seed(seed)``."""
        import torch

        from lightning_modules.nets.cnn import MnistCNN

        torch.manual_seed(self.seed)
        return MnistCNN(num_classes=self.num_classes, width=self.width, hidden=self.hidden)

    def local_trainer(self):
        from lightning_modules.federated import LocalTrainer

        return LocalTrainer(lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                            local_epochs=self.local_epochs, batch_size=self.batch_size,
                            max_steps=self.max_local_steps)  # fmt: skip

    def recipe(self, net):
        from lightning_modules.federated import FedAvg, FederatedRecipe

        return FederatedRecipe(net=net, clients_per_round=self.clients_per_round, local=self.local_trainer(),
                               aggregator=FedAvg(), server_lr=self.server_lr, seed=self.seed)  # fmt: skip


def engine_seed(*parts: int) -> int:
    """The engine's seed mixer (``(seed, round)`` picks the clients, ``(seed, round, client)`` shuffles a
    client's data), so the bare loop and the Flower clients draw exactly the engine's batches."""
    from lightning_modules.federated.recipe import _seed

    return _seed(*parts)


def sample_clients(seed: int, round: int, num_clients: int, k: int) -> list[int]:
    """The round's clients as the engine draws them without an attack (checked by the final-model equality)."""
    import torch

    g = torch.Generator().manual_seed(engine_seed(seed, round))
    return torch.randperm(num_clients, generator=g)[:k].tolist()


def local_sgd(model, x, y, lr: float, momentum: float, weight_decay: float, epochs: int, batch_size: int,
              seed: int, max_steps: int | None = None) -> None:  # fmt: skip
    """Plain local training of one client, the steps ``LocalTrainer.train`` takes: a fresh SGD optimizer, a
    permutation per epoch from ``Generator().manual_seed(seed)``, cross-entropy on each batch, at most
    ``max_steps`` steps. Used by the bare loop and by the Flower clients (imports only torch)."""
    import torch
    import torch.nn.functional as F

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    steps = 0
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for s in range(0, len(y), batch_size):
            idx = perm[s : s + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            if max_steps is not None and steps >= max_steps:
                return


def round_plan(job: FLJob, rounds: int, num_samples: list[int]) -> list[list[tuple[int, int, int]]]:
    """Per round, the engine's ``(client, shuffling seed, num_samples)`` triples."""
    return [[(c, engine_seed(job.seed, r, c), num_samples[c])
             for c in sample_clients(job.seed, r, job.num_clients, job.clients_per_round)]
            for r in range(rounds)]  # fmt: skip


def quiet_lightning() -> None:
    """Silence Lightning's per-fit banners and warnings (call after importing lightning: it resets its level)."""
    import logging
    import warnings

    import lightning  # noqa: F401

    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.ERROR)


# ------------------------------------------------------------------------------------------- peak memory
def peak_rss_kib() -> int:
    """This process's own peak resident set size (KiB): ``VmHWM`` of ``/proc/self/status``.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries the high-water mark of the address space a process
    had before ``exec`` into it (``exec_mmap`` -> ``setmax_mm_hiwater_rss``), so a child started by a large
    parent (``subprocess`` forks or vforks it) reports the parent's peak when that is larger. ``VmHWM`` belongs
    to the address space that ``exec`` created, so it is the child's own.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    import resource  # not Linux: no /proc; ru_maxrss is the best there is

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss_mb() -> float:
    """:func:`peak_rss_kib` in MiB."""
    return peak_rss_kib() / 1024


TIME_V = "/usr/bin/time"


def run_fresh(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
              timeout: float | None = None) -> tuple[str, int | None]:  # fmt: skip
    """Run ``cmd`` in a fresh process under GNU ``/usr/bin/time -v`` (when installed); return its stdout and the
    peak RSS (KiB) that ``time`` reports from ``wait4`` (None without ``time``). ``time`` is a small process, so the child it forks does
    not inherit this (large) process's high-water mark: an independent check of the child's own ``VmHWM``."""
    import subprocess

    timed = os.path.exists(TIME_V)
    full = [TIME_V, "-v", *cmd] if timed else cmd
    res = subprocess.run(full, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    rss = None
    if timed:
        for line in res.stderr.splitlines():
            if "Maximum resident set size" in line:
                rss = int(line.rsplit(":", 1)[1])
    return res.stdout, rss


def check_rss(own_mb: float, time_mb: float | None, what: str, tolerance: float = 0.05) -> str:
    """One line comparing a child's ``VmHWM`` with ``/usr/bin/time -v``'s figure (same unit); raises if they
    disagree by more than ``tolerance`` (relative): then one of the two is not the child's own peak."""
    if time_mb is None:
        return f"{what}: {own_mb:.0f} MB (VmHWM; /usr/bin/time not installed: apt-get install time to cross-check)"
    if abs(own_mb - time_mb) > tolerance * max(own_mb, time_mb):
        raise RuntimeError(f"{what}: VmHWM {own_mb:.0f} MB but /usr/bin/time -v {time_mb:.0f} MB")
    return f"{what}: {own_mb:.0f} MB (VmHWM), {time_mb:.0f} MB (/usr/bin/time -v)"


# ---------------------------------------------------------------------------------------------- reporting
def machine_note() -> dict[str, Any]:
    """What else the machine is doing: load averages and the busiest other processes (from /proc)."""
    busy = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid = int(stat.parent.name)
            if pid == os.getpid():
                continue
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[0] == "R":
                cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                busy.append(cmd[:120])
        except (OSError, ValueError, IndexError):
            continue
    return {"cpus": os.cpu_count(), "loadavg": os.getloadavg(), "running_processes": busy[:8],
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version()}  # fmt: skip


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(name: str, record: dict[str, Any], out: Path | None = None) -> Path:
    """Write ``record`` to ``out`` (a ``.json`` file, or a folder that gets ``<name>.json``), or ``runs/bench/``."""
    out = Path(out) if out is not None else None
    path = out if out is not None and out.suffix == ".json" else (out or OUT_DIR) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__")
                               else str(o)))  # fmt: skip
    return path
