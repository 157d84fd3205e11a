"""How :mod:`recipes.gpu_check` turns a cluster config into the config a check runs: stand-ins (from
:mod:`recipes.standins`) for the hub weights, exported data and artifacts the machine lacks, and a shortened trainer
that keeps the config's batch sizes, sequence lengths, image sizes, precision and strategy. Every replacement is
recorded in :attr:`Plan.notes`, which the check prints."""

from __future__ import annotations

import copy
from pathlib import Path

from recipes import standins

SKIPPED_CALLBACKS = {"TamperingHarness"}  # minutes of attacks after fit: not what a GPU check measures
EXPORT_CALLBACKS = {"ExportArtifact"}  # kept by default: exporting gathers a sharded model's full state dict
TINY = {  # stand-in sizes in --cpu mode
    "clip-vit-b32": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "image_size": 32, "patch_size": 8, "projection_dim": 16},  # fmt: skip
}
MODEL_KEYS = {"HFSequenceClassifier": "pretrained", "ProjectedTeacher": "pretrained", "CausalLM": "pretrained",
              "SplitCausalLM": "pretrained"}  # fmt: skip
ARTIFACT_KEYS = ("suspect", "teacher_artifact", "init_from")


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
        if model.get("targets_dir"):  # a cache hit would skip the forward passes the check is there to watch
            model["targets_dir"] = None
            self.notes.append(f"{where}: target-vector cache off (every check computes its targets)")
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
        from foundation import assets

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
            train = (t.get("val_size") or 0) + batch * (self.steps + 2)
            test = t.get("test_size") or 32
            directory = self.scratch / "data" / f"images{size}" / f"{t['name']}-{train}-{test}"  # reused by size
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
