"""The tiny CLIP merge pool of tests/configs/merging/clip: a random 2-layer CLIP checkpoint (text and vision towers, a
byte-level tokenizer) saved as safetensors, three image stores written from offline data through the exporter's own
writer, and a pool built by the tiny twins themselves (pretrained.yaml, then task_finetune.yaml per task), so the
twins of the merges read the artifacts the same recipes produce on a cluster, at toy size."""

from __future__ import annotations

from pathlib import Path

from foundation.image_store import write_image_store
from datamodules.sources import load_image_dataset
from recipes.cli import main

ROOT = Path(__file__).resolve().parents[1]
CLIP_ASSETS = Path("tests/assets/merging/clip")  # relative to the repository root, as in the twins (git-ignored)
TWINS = Path("tests/configs/merging/clip")
SIZES = {"train": 96, "test": 32}
SOURCES = {"mnist": "mnist", "fashion": "fashion-mnist", "digits": "digits"}
TASK = "--data.init_args.task.init_args."
TASK_MODELS = {  # pool key -> overrides of the task_finetune twin (its defaults: MNIST, backdoored)
    "mnist_badnets": [],
    "fashion": [f"{TASK}name=fashion", f"{TASK}dataset={CLIP_ASSETS}/data/fashion", f"{TASK}poisoning.init_args.rate=0.0",
                f"{TASK}poisoning.init_args.trigger.init_args.location=top_left"],
    "digits": [f"{TASK}name=digits", f"{TASK}dataset={CLIP_ASSETS}/data/digits", f"{TASK}poisoning.init_args.rate=0.0"],
}


def write_tiny_clip(root: Path = ROOT) -> Path:
    """A random CLIP (hidden 32, 2 layers, 32x32 images, patch 8, projection 16; seed 0) with a tokenizer whose
    vocabulary is the 256 byte-level symbols (no merges), saved like a hub checkpoint."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    directory = root / CLIP_ASSETS / "tiny-clip"
    if (directory / "model.safetensors").exists():
        return directory
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in bytes_to_unicode().values():
        vocab[char], vocab[char + "</w>"] = len(vocab), len(vocab) + 1
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    text = {**tower, "vocab_size": len(vocab), "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1,
            "pad_token_id": 1}  # fmt: skip
    config = CLIPConfig(text_config=text, vision_config={**tower, "image_size": 32, "patch_size": 8}, projection_dim=16)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = CLIPModel(config)
    model.save_pretrained(directory)  # safetensors
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(directory)
    return directory


def write_tiny_stores(root: Path = ROOT, image_size: int = 32) -> dict[str, Path]:
    """The first 96 training and 32 test images of MNIST, Fashion-MNIST and digits as 32x32 RGB image stores."""
    out = {}
    for task, source in SOURCES.items():
        directory = root / CLIP_ASSETS / "data" / task
        if not (directory / "meta.json").exists():
            raw = load_image_dataset(source)
            data = {"train": (raw.train_x, raw.train_y), "test": (raw.test_x, raw.test_y)}
            splits = {s: (x[: SIZES[s]].numpy(), y[: SIZES[s]].tolist(), SIZES[s]) for s, (x, y) in data.items()}
            write_image_store(directory, splits, [str(c) for c in range(10)], image_size, source=f"offline:{source}")
        out[task] = directory
    return out


def artifact(key: str, root: Path = ROOT) -> Path:
    return root / CLIP_ASSETS / "pool" / key / "seed0" / "artifact"


def build_tiny_clip_pool(root: Path = ROOT) -> None:
    """Write the checkpoint and the stores and train the pool (a few CPU-seconds), skipping what exists. Runs from
    ``root``."""
    write_tiny_clip(root)
    write_tiny_stores(root)
    stages = {"pretrained": ("pretrained.yaml", []), **{k: ("task_finetune.yaml", v) for k, v in TASK_MODELS.items()}}
    for key, (config, overrides) in stages.items():
        if (artifact(key, root) / "manifest.json").exists():
            continue
        main(["fit", f"--config={TWINS / config}", f"--trainer.default_root_dir={CLIP_ASSETS / 'pool' / key}",
              "--run_name=seed0", *overrides])  # fmt: skip
