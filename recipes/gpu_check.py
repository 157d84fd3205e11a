"""``python -m recipes.gpu_check``: every cluster config runs a few training steps on one GPU, with its throughput,
memory, device placement and precision checked (``scripts/gpu_check.sh``; docs/cluster.md).

Each check takes a cluster config (``configs/``), stacks the trainer overlay it is meant for (FSDP for the 8B full
fine-tuning runs, DDP for the federated ResNet-18, ...) and runs ``--steps`` training steps through the project's own
CLI with a :class:`~recipes.gpu_probe.Probe` attached (what it asserts is listed there). Whatever the machine lacks is
replaced, and each replacement is printed (:mod:`recipes.standins`): hub backbones by the real architecture with random
weights (``--layers N`` cuts the depth for a short check; with ``--layers`` the depth is cut even where the weights
exist), exported data by synthetic data of the configured shapes, artifacts of earlier stages by random weights. The
check shortens a run (no validation, no checkpoints, no tampering harness, NAMET: ``--edits`` edits and
``--stats-tokens`` statistics tokens) but keeps its batch sizes, sequence lengths, image sizes and precision.

``--cpu`` runs the same code on the tiny twins (``tests/configs/``) with accelerator ``cpu`` (the default tests do,
so this script cannot rot); ``--synthetic`` replaces data and pools even where they exist.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from recipes import standins
from recipes.gpu_probe import NO_MATMUL, Probe

REPO = Path(__file__).resolve().parents[1]
CONFIGS, TWINS = REPO / "configs", REPO / "tests" / "configs"
SKIPPED_CALLBACKS = {"TamperingHarness"}  # minutes of attacks after fit: not what a GPU check measures
EXPORT_CALLBACKS = {"ExportArtifact"}  # kept by default: exporting gathers a sharded model's full state dict
TINY = {  # stand-in sizes in --cpu mode
    "clip-vit-b32": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "image_size": 32, "patch_size": 8, "projection_dim": 16},  # fmt: skip
}
MODEL_KEYS = {"HFSequenceClassifier": "pretrained", "ProjectedTeacher": "pretrained", "CausalLM": "pretrained",
              "SplitCausalLM": "pretrained"}  # fmt: skip
ARTIFACT_KEYS = ("suspect", "teacher_artifact", "init_from")


@dataclass(frozen=True)
class Check:
    """One cluster config, the trainer overlays stacked before it, and the processes it runs on."""

    name: str
    config: str
    overlays: tuple[str, ...] = ()
    processes: int = 1
    max_steps: int | None = None  # NAMET: one training step is the whole batch of edits


CHECKS = [
    Check("tar_llama3_8b_fsdp", "tar/llama3_8b_tar_fsdp.yaml", ("trainer/fsdp.yaml",)),
    Check("w2s_llama3_8b_poison_fsdp", "w2sdefense/llama3_8b_poison.yaml", ("trainer/fsdp.yaml",)),
    Check("w2s_llama3_8b_teacher", "w2sdefense/llama3_8b_teacher.yaml"),
    Check("w2s_llama3_8b_w2sdefense", "w2sdefense/llama3_8b_w2sdefense.yaml"),
    Check("namet_llama2_7b", "namet/llama2_7b_counterfact_namet.yaml", ("trainer/gpu.yaml",), max_steps=1),
    Check("fl_cifar10_resnet18", "chameleon/cifar10_resnet18_normclip.yaml"),
    Check("fl_cifar10_resnet18_ddp", "chameleon/cifar10_resnet18_normclip.yaml", ("trainer/ddp.yaml",)),
    Check("fl_cifar10_resnet18_ddp2", "chameleon/cifar10_resnet18_normclip.yaml", ("trainer/ddp.yaml",), processes=2),
    *(Check(f"clip_{stage}", f"merging/clip/{stage}.yaml")
      for stage in ("pretrained", "task_finetune", "task_arithmetic", "ties", "dare", "adamerging", "dam")),
]


def _nodes(obj, path: str = ""):
    """``(path, class name, init_args)`` of every ``class_path`` node of a config, depth first."""
    if isinstance(obj, dict):
        if "class_path" in obj:
            obj.setdefault("init_args", {})
            yield path, obj["class_path"].rsplit(".", 1)[-1], obj["init_args"]
        for key, value in obj.items():
            yield from _nodes(value, f"{path}.{key}" if path else str(key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _nodes(value, f"{path}[{i}]")


def hub_available(name: str) -> bool:
    """A local directory, or a hub id whose ``config.json`` is in the local Hugging Face cache."""
    if Path(name).exists():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # noqa: BLE001 - not a valid repo id: not available
        return False


class Plan:
    """Turns one config into the config a check runs: stand-ins for what is missing, a shortened trainer."""

    def __init__(self, scratch: Path, steps: int, tiny: bool, layers: int | None, synthetic: bool, edits: int,
                 stats_tokens: int, write: bool = True, export: bool = True):  # fmt: skip
        self.scratch, self.steps, self.tiny, self.layers = scratch, steps, tiny, layers
        self.synthetic, self.edits, self.stats_tokens, self.write = synthetic, edits, stats_tokens, write
        self.skipped = SKIPPED_CALLBACKS | (set() if export else EXPORT_CALLBACKS)
        self.notes: list[str] = []
        self.env: dict[str, str] = {}

    def _kind_dir(self, kind: str) -> str:
        directory = self.scratch / "models" / (kind + (f"-{self.layers}layers" if self.layers else ""))
        if self.write and not (directory / "config.json").exists():
            standins.write_model_dir(directory, kind, self.layers)
        return str(directory)

    def _standin_hub(self, args: dict, key: str, where: str, model: bool) -> None:
        name = args.get(key)
        kind = standins.HUB_ARCHITECTURES.get(name)
        if kind is None or not (self.synthetic or (model and self.layers) or not hub_available(name)):
            return
        args[key] = self._kind_dir(kind)
        if model:
            args["random_init"] = True
            depth = standins.architecture(kind, self.layers)["num_hidden_layers"]
            full = standins.architecture(kind)["num_hidden_layers"]
            self.notes.append(f"{where}: {name} -> random {kind}, {depth} of {full} layers")
        else:
            self.notes.append(f"{where}: tokenizer {name} -> word-level stand-in")

    def _clip(self, args: dict, where: str, force: bool = False) -> dict | None:
        name = args.get("model_name_or_path")
        if name is None:
            return args.get("vision_config")
        if not (force or self.synthetic or self.layers or not hub_available(name)):
            return None
        config = TINY["clip-vit-b32"] if self.tiny else standins.architecture("clip-vit-b32", self.layers)
        args.update(model_name_or_path=None, vision_config=dict(config))
        depth = f"{config['num_hidden_layers']} layers" if self.tiny else f"{config['num_hidden_layers']} of 12 layers"
        note = f"{where}: {name} -> {'tiny ' if self.tiny else ''}random CLIP vision tower, {depth}"
        if args.get("head_init") == "zero_shot":
            args["head_init"] = "random"
            note += ", random head instead of the zero-shot head (no text tower)"
        self.notes.append(note)
        return args["vision_config"]

    def _merge_pool(self, args: dict, net: dict, where: str) -> None:
        paths = [args.get("pretrained"), *args.get("task_models", [])]
        paths = [p for p in paths if p is not None]
        if not paths or (not self.synthetic and all((Path(p) / "manifest.json").exists() for p in paths)):
            return
        vision = self._clip(net, f"{where}.net", force=True)
        tasks = len(args.get("task_models", []))
        tag = "tiny" if self.tiny else f"{vision['num_hidden_layers']}layers"
        directory = self.scratch / "pools" / f"clip-{tag}-{max(tasks, 1)}"
        if self.write and not (directory / f"task{max(tasks, 1) - 1}" / "manifest.json").exists():
            standins.write_clip_pool(directory, vision, max(tasks, 1))
        if args.get("pretrained") is not None:
            args["pretrained"] = str(directory / "pretrained")
        if "task_models" in args:
            args["task_models"] = [str(directory / f"task{k}") for k in range(tasks)]
        self.notes.append(f"{where}: artifacts -> random tower" + (f" + {tasks} task models at 1e-3 offsets" if tasks
                                                                    else ""))  # fmt: skip

    def _text_data(self, args: dict, where: str) -> None:
        from datamodules.sources import TEXT_DATASETS

        dataset = args.get("dataset", "rotten-tomatoes")
        if dataset in TEXT_DATASETS or (not self.synthetic and (Path(dataset) / "meta.json").exists()):
            return
        batch, evals = args.get("batch_size", 32), args.get("eval_batch_size") or 32
        sizes = {"train": batch * (self.steps + 2), "validation": evals, "test": evals}
        directory = self.scratch / "data" / Path(dataset).name
        if self.write:
            standins.write_text_classification(directory, sizes, args.get("max_length", 64))
        args["dataset"] = str(directory)
        self.notes.append(f"{where}: {dataset} -> synthetic text store, {sizes['train']} train rows of "
                          f"{args.get('max_length', 64)} words")  # fmt: skip

    def _domain_data(self, args: dict, where: str) -> None:
        data_dir = args["data_dir"]
        if not self.synthetic and (Path(data_dir) / "meta.json").exists():
            return
        directory = self.scratch / "data" / Path(data_dir).name
        if self.write:
            standins.write_domain(directory, texts=200, questions=64, length=args.get("max_length", 256))
        args["data_dir"] = str(directory)
        self.notes.append(f"{where}: {data_dir} -> synthetic WMDP store, 200 forget and retain texts")

    def _facts(self, args: dict, model: dict, where: str) -> None:
        if not self.tiny:
            args["num_edits"] = min(args.get("num_edits") or self.edits, self.edits)
            model["stats_tokens"] = min(model.get("stats_tokens", self.stats_tokens), self.stats_tokens)
            self.notes.append(f"{where}: {args['num_edits']} edits, {model['stats_tokens']} statistics tokens")
        model["stats_dir"] = str(self.scratch / "editing-stats")
        source = args.get("source", "country-facts")
        if source != "country-facts" and (self.synthetic or not Path(source).exists()):
            path = self.scratch / "data" / "counterfact.json"
            if self.write:
                standins.write_counterfact(path, (args.get("num_edits") or 100) + (args.get("val_size") or 0) + 8)
            args["source"] = str(path)
            self.notes.append(f"{where}: {source} -> synthetic CounterFact records")
        corpus = model.get("stats_corpus")
        if corpus and (self.synthetic or not Path(corpus).exists()):
            length = model.get("stats_seq_len", 512)
            lines = model.get("stats_tokens", 10000) // length + 2
            path = self.scratch / "data" / "stats_corpus.txt"
            if self.write:
                standins.write_corpus(path, lines, length)
            model["stats_corpus"] = str(path)
            self.notes.append(f"{where}: {corpus} -> synthetic corpus, {lines} lines of {length} words")

    def _cifar(self, args: dict, where: str) -> None:
        if args.get("dataset") != "cifar10":
            return
        from recipes import assets

        try:
            assets.cifar10_files()
            if not self.synthetic:
                return
        except assets.AssetNotFoundError:
            pass
        cache = self.scratch / "cache"
        per_batch, test = (200, 200) if self.tiny else (10000, 10000)  # the real 50k/10k split
        if self.write and not (cache / "cifar10" / "cifar-10-batches-bin" / "test_batch.bin").exists():
            standins.write_cifar10(cache, per_batch, test)
        self.env["SAFEWEIGHTS_CACHE"] = str(cache)
        self.notes.append(f"{where}: cifar10 -> synthetic binary batches ({5 * per_batch} train, {test} test)")

    def _image_tasks(self, args: dict, where: str) -> None:
        tasks = args.get("tasks") or ([args["task"]] if "task" in args else [])
        size, batch = args.get("image_size", 28), args.get("batch_size", 64)
        for task in tasks:
            t = task["init_args"]
            if not self.synthetic and (Path(t["dataset"]) / "meta.json").exists():
                continue
            directory = self.scratch / "data" / f"images{size}" / t["name"]
            train = (t.get("val_size") or 0) + batch * (self.steps + 2)
            test = t.get("test_size") or 32
            if self.write and not (directory / "meta.json").exists():
                standins.write_images(directory, train, test, size)
            t["dataset"] = str(directory)
            self.notes.append(f"{where}: {t['name']} -> synthetic {size}px images ({train} train, {test} test)")
            if t.get("labels") == "class":
                t.pop("labels")

    def config(self, cfg: dict, name: str, max_steps: int | None) -> dict:
        cfg = copy.deepcopy(cfg)
        trainer = cfg.setdefault("trainer", {})
        steps = min(self.steps, max_steps or self.steps)
        trainer.update(max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False,
                       logger=False, enable_progress_bar=False, enable_model_summary=False,
                       default_root_dir=str(self.scratch / "runs" / name))  # fmt: skip
        trainer.pop("val_check_interval", None)
        callbacks = trainer.get("callbacks") or []
        trainer["callbacks"] = [c for c in callbacks if c.get("class_path", "").rsplit(".", 1)[-1]
                                not in self.skipped]  # fmt: skip
        model, data = cfg["model"], cfg["data"]
        for where, cls, args in list(_nodes(model, "model")):
            if cls in MODEL_KEYS:
                self._standin_hub(args, MODEL_KEYS[cls], where, model=True)
            if cls == "CLIPImageClassifier":
                self._clip(args, where)
            if "task_models" in args or (cls == "TaskFineTuning" and args.get("pretrained")):
                self._merge_pool(args, args["net"]["init_args"], where)
            for key in ARTIFACT_KEYS:
                if isinstance(args.get(key), str) and (self.synthetic or not Path(args[key]).exists()):
                    self.notes.append(f"{where}.{key}: {args[key]} -> none (the built random weights)")
                    args[key] = None
        for where, cls, args in list(_nodes(data, "data")):
            if "tokenizer" in args:
                self._standin_hub(args, "tokenizer", where, model=False)
            if cls == "TextClassificationDataModule":
                self._text_data(args, where)
            elif cls == "TamperWMDPDataModule":
                self._domain_data(args, where)
            elif cls == "CounterFactDataModule":
                self._facts(args, model["init_args"], where)
            elif cls == "FederatedDataModule":
                self._cifar(args, where)
            elif cls in ("MultiTaskDataModule", "TaskImageDataModule"):
                self._image_tasks(args, where)
        return cfg


def declared_dtypes(cfg: dict) -> set[str]:
    """dtypes a config sets on its networks (``dtype``, ``compute_dtype``), which the trainer precision keeps."""
    return {args[k] for _, _, args in _nodes(cfg.get("model", {})) for k in ("dtype", "compute_dtype")
            if isinstance(args.get(k), str)}  # fmt: skip


def run_prepared(check: Check, config: Path, accelerator: str, devices: int, scan: bool) -> dict:
    """Fit ``config`` (stacked after the check's overlays) with a probe; returns its table row."""
    import torch

    from datamodules.sources import load_image_dataset
    from recipes.cli import main

    load_image_dataset.cache_clear()  # a synthetic CIFAR-10 cache may replace the real one
    argv = [*(f"--config={CONFIGS / o}" for o in check.overlays), f"--config={config}",
            f"--trainer.accelerator={accelerator}", f"--trainer.devices={devices}"]  # fmt: skip
    if accelerator == "cpu" and any("fsdp" in o for o in check.overlays):
        argv.append("--trainer.strategy=ddp")  # Lightning's FSDP needs a GPU; the CPU mode keeps the rest
    cli = main(argv, run=False)
    probe = Probe(scan=scan, max_batches=yaml.safe_load(config.read_text())["trainer"]["max_steps"])
    cli.trainer.callbacks.append(probe)
    if accelerator == "gpu":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    row = probe.summary(cli.trainer.precision, declared_dtypes(yaml.safe_load(config.read_text())))
    row.update(check=check.name, fit_s=time.perf_counter() - start, processes=cli.trainer.world_size,
               device=str(probe.device), rank=cli.trainer.global_rank)  # fmt: skip
    if accelerator == "gpu":
        row["gpu"] = torch.cuda.get_device_name(probe.device)
    return row


def run_check(check: Check, args, scratch: Path) -> dict:
    source = (TWINS if args.cpu else CONFIGS) / check.config
    plan = Plan(scratch, args.steps, args.cpu, args.layers, args.synthetic, args.edits, args.stats_tokens,
                export=not args.no_export)  # fmt: skip
    cfg = plan.config(yaml.safe_load(source.read_text()), check.name, check.max_steps)
    config = scratch / "configs" / f"{check.name}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    print(f"== {check.name}: {source.relative_to(REPO)} + {', '.join(check.overlays) or 'no overlay'}"
          f" ({check.processes} process{'es' if check.processes > 1 else ''})", flush=True)  # fmt: skip
    if args.cpu and any("fsdp" in o for o in check.overlays):
        plan.notes.append("trainer.strategy: fsdp -> ddp (Lightning's FSDP needs a GPU)")
    for note in plan.notes:
        print(f"   stand-in {note}", flush=True)
    accelerator = "cpu" if args.cpu else "gpu"
    old = {k: os.environ.get(k) for k in plan.env}
    os.environ.update(plan.env)
    try:
        if check.processes == 1:
            return run_prepared(check, config, accelerator, 1, not args.no_scan)
        out = scratch / f"{check.name}.json"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "recipes.gpu_check", "--only", check.name, "--prepared", str(config),
               "--json", str(out), *(["--cpu"] if args.cpu else []), *(["--no-scan"] if args.no_scan else [])]
        subprocess.run(cmd, check=True, cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": str(REPO)})
        return json.loads(out.read_text().splitlines()[0])
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(rows: list[dict]) -> str:
    head = ["check", "proc", "params M (trained)", "precision", "verdict", "steps/s", "samples/s", "GPU peak GB",
            "host peak GB", "FSDP units", "problems"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        params = f"{_fmt(r.get('params_m'), 1)} ({_fmt(r.get('trained_params_m'), 1)})"
        cells = [r["check"], _fmt(r.get("processes")), params, r.get("precision", "-"), r.get("precision_ok", "-"),
                 _fmt(r.get("steps_per_s"), 3), _fmt(r.get("samples_per_s"), 1), _fmt(r.get("gpu_peak_gb")),
                 _fmt(r.get("host_peak_gb")), _fmt(r.get("fsdp_units")),
                 "; ".join(r.get("problems", [])) or r.get("error", "") or "none"]  # fmt: skip
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m recipes.gpu_check", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--cpu", action="store_true", help="run the tiny twins of tests/configs on the CPU")
    parser.add_argument("--only", nargs="+", metavar="CHECK", help=f"checks to run: {[c.name for c in CHECKS]}")
    parser.add_argument("--steps", type=int, default=3, help="training steps per check (the first is not timed)")
    parser.add_argument("--layers", type=int, default=None,
                        help="cut every stand-in backbone to N layers (random weights even where real ones exist)")
    parser.add_argument("--synthetic", action="store_true", help="stand-ins even for assets that are present")
    parser.add_argument("--edits", type=int, default=64, help="NAMET: edits in the check (config: 10000)")
    parser.add_argument("--stats-tokens", type=int, default=65536, help="NAMET: corpus tokens for the statistics")
    parser.add_argument("--processes", type=int, default=None,
                        help="run the 2-process DDP check (default: on GPU when 2+ GPUs are visible, never on CPU)")
    parser.add_argument("--no-scan", action="store_true", help="skip the operator device scan of the first step")
    parser.add_argument("--no-export", action="store_true",
                        help="drop ExportArtifact (an 8B export writes 16 GB; kept by default: it gathers FSDP shards)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/gpu_check"), help="stand-ins, configs and runs")
    parser.add_argument("--json", type=Path, default=None, help="also write one JSON row per check to this file")
    parser.add_argument("--prepared", type=Path, default=None, help=argparse.SUPPRESS)  # a multi-process child
    args = parser.parse_args(argv)
    if args.steps < 1 or (args.layers is not None and args.layers < 1):
        parser.error("--steps and --layers must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch

    if args.prepared is not None:  # one check in this process (and the ranks Lightning launches from it)
        check = next(c for c in CHECKS if c.name == args.only[0])
        row = run_prepared(check, args.prepared, "cpu" if args.cpu else "gpu", check.processes, not args.no_scan)
        if row["rank"] == 0:
            args.json.write_text(json.dumps(row) + "\n")
        return 0
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device is visible: run on a GPU node, or use --cpu for the tiny twins", file=sys.stderr)
        return 2
    gpus = 0 if args.cpu else torch.cuda.device_count()
    multi = args.processes if args.processes is not None else (2 if gpus >= 2 else 1)
    unknown = set(args.only or []) - {c.name for c in CHECKS}
    if unknown:
        print(f"unknown checks {sorted(unknown)}; choose from {[c.name for c in CHECKS]}", file=sys.stderr)
        return 2
    scratch = args.workdir.resolve()
    rows = []
    for check in CHECKS:
        if args.only and check.name not in args.only:
            continue
        if check.processes > multi:
            print(f"== {check.name}: skipped ({check.processes} processes; "
                  f"{'pass --processes 2' if args.cpu else f'{gpus} GPU visible'})", flush=True)  # fmt: skip
            continue
        try:
            row = run_check(check, args, scratch)
        except Exception as err:  # noqa: BLE001 - one broken config must not hide the others
            row = {"check": check.name, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as out:
                out.write(json.dumps(row) + "\n")
    print()
    if args.layers:
        print(f"stand-in backbones cut to {args.layers} layers: memory and speed are not those of the full depth")
    print(table(rows))
    bad = [r["check"] for r in rows if r.get("error") or r.get("problems")
           or r.get("precision_ok") not in ("ok", NO_MATMUL)]  # fmt: skip
    if bad:
        print(f"\nFAILED: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
