"""The Flower side of ``fl_vs_flower.py``: the same FedAvg job as a Flower app (Message API: ``ServerApp`` with
``flwr.serverapp.strategy.FedAvg``, a ``ClientApp`` with a ``@train`` function) run by Flower's simulation
engine (``flwr.simulation.run_simulation``, Ray backend).

Run as a child process by ``fl_vs_flower.py`` (``python benchmarks/_flower_app.py WORKDIR``) so that Flower and
its pinned dependencies never enter the engine's process. It imports no project package: the model class is
loaded from ``lightning_modules/nets/cnn.py`` by path, and the client data, the initial model and the round plan
(the engine's clients and shuffling seeds per round) come from ``WORKDIR``, written by the parent.

The strategy samples nodes as Flower's FedAvg does, then tells each sampled node which partition to train and
with which seed (the engine's), so both engines do the same local steps on the same batches and the parent can
check that the final models agree. Each client trains with the bare loop of ``_common.local_sgd``.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from benchmarks._common import local_sgd


def load_cnn_class():
    """``MnistCNN`` from its source file, without importing the project's packages (Lightning & co.)."""
    spec = importlib.util.spec_from_file_location("_bench_cnn", ROOT / "lightning_modules" / "nets" / "cnn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MnistCNN


_ACTOR_STATE: dict[str, dict] = {}  # per process (Ray actor): the loaded data and a model to train in


def _actor_state(workdir: str) -> dict:
    if workdir not in _ACTOR_STATE:
        torch.set_num_threads(1)
        data = torch.load(Path(workdir) / "data.pt", weights_only=True)
        job = json.loads((Path(workdir) / "job.json").read_text())
        model = load_cnn_class()(num_classes=job["num_classes"], width=job["width"], hidden=job["hidden"])
        _ACTOR_STATE[workdir] = {**data, "job": job, "model": model}
    return _ACTOR_STATE[workdir]


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = msg.content["config"]
    st = _actor_state(str(cfg["workdir"]))
    job, model = st["job"], st["model"]
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    idx = st["client_idx"][int(cfg["client"])]
    x, y = st["x"][idx], st["y"][idx]
    local_sgd(model, x, y, job["lr"], job["momentum"], job["weight_decay"], job["local_epochs"], job["batch_size"],
              int(cfg["seed"]), job["max_local_steps"])  # fmt: skip
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": len(y)})})
    return Message(content=content, reply_to=msg)


class PlannedFedAvg(FedAvg):
    """Flower's FedAvg whose sampled nodes train the engine's clients of the round, with the engine's seeds."""

    def __init__(self, plan: list, workdir: str, num_clients: int, clients_per_round: int) -> None:
        super().__init__(fraction_train=clients_per_round / num_clients, fraction_evaluate=0.0,
                         min_train_nodes=clients_per_round, min_available_nodes=num_clients)  # fmt: skip
        self.plan, self.workdir = plan, workdir
        self.round_starts: list[float] = []

    def configure_train(self, server_round, arrays, config, grid):
        self.round_starts.append(time.perf_counter())
        sampled = list(super().configure_train(server_round, arrays, config, grid))
        plan = self.plan[server_round - 1]
        if len(sampled) != len(plan):
            raise RuntimeError(f"Flower sampled {len(sampled)} nodes, the plan has {len(plan)} clients")
        out = []
        for msg, (client, seed, _) in zip(sampled, plan):
            cfg = ConfigRecord({"client": int(client), "seed": int(seed), "workdir": self.workdir,
                                "server-round": server_round})  # fmt: skip
            out.append(Message(content=RecordDict({"arrays": arrays, "config": cfg}), message_type=MessageType.TRAIN,
                               dst_node_id=msg.metadata.dst_node_id))  # fmt: skip
        return out


def main(workdir: str) -> None:
    wd = Path(workdir)
    job = json.loads((wd / "job.json").read_text())
    plan = json.loads((wd / "plan.json").read_text())
    state0 = torch.load(wd / "initial.pt", weights_only=True)
    if not job.get("verbose"):
        logging.getLogger("flwr").setLevel(logging.WARNING)
    result: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def server_main(grid: Grid, context: Context) -> None:
        strategy = PlannedFedAvg(plan, str(wd), job["num_clients"], job["clients_per_round"])
        def keep_round_one(server_round: int, arrays: ArrayRecord) -> None:  # for the parent's equality check
            if server_round == 1:
                torch.save(arrays.to_torch_state_dict(), wd / "round1.pt")

        out = strategy.start(grid=grid, initial_arrays=ArrayRecord(state0), num_rounds=len(plan),
                             evaluate_fn=keep_round_one)  # fmt: skip
        end = time.perf_counter()
        stamps = strategy.round_starts + [end]
        result["round_s"] = [b - a for a, b in itertools.pairwise(stamps)]
        torch.save(out.arrays.to_torch_state_dict(), wd / "final.pt")

    cpus = job["flower_cpus"]
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": cpus, "num_gpus": 0, "logging_level": "error", "log_to_driver": False}}
    t0 = time.perf_counter()
    from flwr.simulation import run_simulation

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=job["num_clients"],
                   backend_config=backend, verbose_logging=bool(job.get("verbose")))  # fmt: skip
    result["total_s"] = time.perf_counter() - t0
    if "round_s" not in result:
        raise RuntimeError("Flower's simulation ended without running the ServerApp's rounds (see its log above)")
    import flwr
    import ray

    result.update(flwr=flwr.__version__, ray=ray.__version__, pid=os.getpid())
    (wd / "flower_result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    # Run from the importable module, not __main__: Ray then pickles the ClientApp by reference and every
    # actor keeps its loaded data (_ACTOR_STATE) across messages.
    import benchmarks._flower_app as app

    app.main(sys.argv[1])
