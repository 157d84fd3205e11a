"""Model artifacts that are safe to exchange: safetensors weights plus a JSON manifest.

An artifact is a directory holding ``model.safetensors`` and ``manifest.json`` (recipe, config, metrics,
parents and the SHA-256 of the weights). The project handles *untrusted* weights, so two rules hold:

* Weights are read only as safetensors (a flat tensor format that cannot run code) or with
  ``torch.load(weights_only=True)`` (:func:`safe_torch_load`). Pickles are refused: unpickling calls whatever
  functions the file names.
* Nothing already written is lost: files go to a temp file in the same directory, are fsynced and moved into
  place with :func:`os.replace`; a whole artifact is built in a sibling temp directory and swapped in complete.

Every refusal raises :class:`ArtifactError`, whose message names the file, the problem and the fix.
CLI: ``python -m foundation.artifacts verify PATH [--sha256 HEX]`` and ``python -m foundation.artifacts show PATH``.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import hashlib
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import numpy as np
import safetensors
import safetensors.torch
import torch

FORMAT = "safeweights-artifact/1"
MODEL_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
ARTIFACT_DIRNAME = "artifact"
_FILES = {MODEL_FILE, MANIFEST_FILE}
REEXPORT_HINT = "re-export the weights as safetensors (foundation.artifacts.save_artifact) from a trusted environment"
_UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it), then restored
os.umask(_UMASK)


class ArtifactError(ValueError):
    """A refused artifact or checkpoint; the message names the file, the problem and the fix."""


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Returns the hex SHA-256 of a file, read in chunks so large weights need not fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    """Makes renames in ``directory`` durable; best effort (not every platform can open a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Yields a temp file next to ``path`` (its name is ``f.name``); on success it is fsynced and moved onto ``path``.

    On an exception the temp file is removed and ``path`` keeps its previous content. Being in the same
    directory makes :func:`os.replace` an atomic rename, never a cross-filesystem copy.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.tmp-", delete=False)
    try:
        with f:
            os.chmod(f.name, 0o666 & ~_UMASK)  # the permissions open() would give, not mkstemp's 0600
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(f.name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f.name)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (temp file in the same directory, fsync, :func:`os.replace`)."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes UTF-8 ``text`` to ``path`` atomically; see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _jsonable(value: Any, key: str) -> Any:
    """Converts a manifest value to JSON types (Path -> str, tensor/numpy -> number or list, enum -> value)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (os.PathLike, enum.Enum)):
        return _jsonable(os.fspath(value) if isinstance(value, os.PathLike) else value.value, key)
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return value.tolist()  # a 0-d tensor or numpy scalar becomes a Python number
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _jsonable(v, f"{key}.{k}" if key else k) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v, f"{key}[{i}]") for i, v in enumerate(value)]
    raise ArtifactError(
        f"manifest key {key!r} holds a {type(value).__qualname__}, which is not JSON-serializable: store plain data "
        "(str, int, float, bool, None, list, dict with str keys, Path, scalar tensor) instead"
    )


def save_artifact(
    directory: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], manifest: Mapping[str, Any]
) -> Path:
    """Writes ``directory/model.safetensors`` and ``directory/manifest.json`` atomically as a whole.

    Both files are built in a sibling temp directory ``.{name}.tmp-XXXX``; an existing artifact at ``directory``
    is renamed aside, the new one renamed into place, and only then the old one deleted. On any failure the old
    artifact is untouched and the temp directory removed. A directory holding other files is never replaced.

    Args:
        directory: Destination artifact directory.
        state_dict: Tensors to store; copied to contiguous CPU tensors, so tied weights and views are fine.
        manifest: JSON-able metadata (recipe, config, metrics, parents, ...). ``format``, ``created``,
            ``model_file``, ``sha256``, ``num_tensors`` and ``num_parameters`` are set here.

    Returns:
        The artifact directory.

    Raises:
        ArtifactError: A manifest value is not JSON-serializable, ``state_dict`` holds a non-tensor, or
            ``directory`` exists and is not an artifact.
    """
    directory = Path(directory)
    if directory.exists() and not (directory.is_dir() and {p.name for p in directory.iterdir()} <= _FILES):
        raise ArtifactError(f"{directory} exists and is not an artifact; refusing to replace it: pick a new directory")
    record = _jsonable(dict(manifest), "")
    tensors = {}
    for name, tensor in state_dict.items():  # safetensors refuses tensors sharing storage: store separate copies
        if not isinstance(tensor, torch.Tensor):
            raise ArtifactError(f"state_dict[{name!r}] is a {type(tensor).__qualname__}; artifacts hold only tensors")
        tensors[name] = tensor.detach().to(device="cpu", memory_format=torch.contiguous_format, copy=True)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    old = None
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)
        model = tmp / MODEL_FILE
        safetensors.torch.save_file(tensors, str(model), metadata={"format": "pt"})
        os.chmod(model, 0o666 & ~_UMASK)  # safetensors may create it 0600
        with open(model, "rb+") as f:
            os.fsync(f.fileno())
        record.update(
            format=FORMAT,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            model_file=MODEL_FILE,
            sha256=sha256_file(model),
            num_tensors=len(tensors),
            num_parameters=sum(t.numel() for t in tensors.values()),
        )
        atomic_write_text(tmp / MANIFEST_FILE, json.dumps(record, indent=2) + "\n")
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(directory, old)
        try:
            os.replace(tmp, directory)
        except BaseException:
            if old is not None:
                os.replace(old, directory)
            raise
        _fsync_dir(directory.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return directory


@dataclass
class Artifact:
    """A verified artifact: its directory, tensors (on CPU) and manifest."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    manifest: dict[str, Any]

    @property
    def sha256(self) -> str:
        """SHA-256 of ``model.safetensors``, as verified when loading."""
        return self.manifest["sha256"]


def _verify(
    path: str | os.PathLike, expected_sha256: str | None = None, check_hash: bool = True
) -> tuple[Path, dict[str, Any], Path]:
    """Finds the artifact, checks manifest, file type and hashes; returns (directory, manifest, model file)."""
    path = Path(path)  # an artifact dir, a file in it, or a run dir holding `artifact/`
    candidates = (path.parent if path.is_file() else path, path / ARTIFACT_DIRNAME)
    directory = next((d for d in candidates if (d / MANIFEST_FILE).is_file()), None)
    if directory is None:
        problem = "does not exist" if not path.exists() else f"has no {MANIFEST_FILE} (nor {ARTIFACT_DIRNAME}/)"
        raise ArtifactError(f"{path} {problem}: pass an artifact written by save_artifact or ExportArtifact")
    file = directory / MANIFEST_FILE
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{file} is not valid JSON ({err}): the artifact is corrupted; re-export it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ArtifactError(f"{file} has format {found!r}, expected {FORMAT!r}: re-export it with save_artifact")
    name = manifest.get("model_file")
    if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
        raise ArtifactError(f"{file}: model_file {name!r} must name a .safetensors file beside it: re-export it")
    model = directory / name
    if not model.is_file():
        raise ArtifactError(f"{model} is missing: the artifact is incomplete; re-export or re-download it")
    with open(model, "rb") as f:  # judge by the first bytes, before any parser sees the file
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header. Its first byte may be 0x80 (a
    # header of 128 + 256k bytes), like a pickle's protocol marker, so the layout is checked first.
    is_safetensors = len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < model.stat().st_size
    if not is_safetensors and (head[:1] == b"\x80" or head[:2] == b"PK"):
        kind = "a pickle" if head[:1] == b"\x80" else "a torch.save (zip of pickles)"
        raise ArtifactError(
            f"{model} is {kind} file, not safetensors; pickles can execute code when loaded and are refused. "
            f"Fix: {REEXPORT_HINT}."
        )
    if not is_safetensors:
        raise ArtifactError(f"{model} is not a safetensors file (unrecognised header): {REEXPORT_HINT}")
    if check_hash:
        actual = sha256_file(model)
        if actual != manifest.get("sha256"):
            raise ArtifactError(
                f"{model}: hash mismatch: the file was modified or corrupted after export (manifest says "
                f"{manifest.get('sha256')}, file is {actual}). Do not use it: re-export or re-download the artifact."
            )
        if expected_sha256 is not None and actual != expected_sha256.lower().removeprefix("sha256:"):
            raise ArtifactError(
                f"{model}: hash mismatch: expected {expected_sha256} but the artifact is {actual}, so it is not the "
                "artifact you pinned: point to the right one, or update the pinned hash if the change is intended."
            )
    return directory, manifest, model


def load_artifact(path: str | os.PathLike, expected_sha256: str | None = None) -> Artifact:
    """Loads and verifies an artifact; the weights are read with safetensors only, onto the CPU.

    Args:
        path: Artifact directory, its ``manifest.json``, or a run directory containing ``artifact/``.
        expected_sha256: Pinned hash of ``model.safetensors`` (e.g. from a config); checked if given.

    Raises:
        ArtifactError: Missing or invalid manifest, a pickle instead of safetensors, or a hash mismatch.
    """
    directory, manifest, model = _verify(path, expected_sha256)
    try:
        state_dict = safetensors.torch.load_file(model, device="cpu")
    except safetensors.SafetensorError as err:
        raise ArtifactError(f"{model} is not a valid safetensors file ({err}): {REEXPORT_HINT}") from None
    return Artifact(directory, state_dict, manifest)


def parent_record(path: str | os.PathLike | Artifact) -> dict[str, Any]:
    """``{"path", "sha256", "recipe"}`` of a parent, for the ``parents`` list of a child manifest.

    A path is verified (hash checked) without loading its tensors; an :class:`Artifact` was verified when loaded.
    """
    directory, manifest = (path.path, path.manifest) if isinstance(path, Artifact) else _verify(path)[:2]
    return {"path": str(Path(directory).resolve()), "sha256": manifest["sha256"], "recipe": manifest.get("recipe")}


@contextlib.contextmanager
def refuse_unsafe_pickles(
    path: str | os.PathLike, safe_globals: Iterable[Any] = (), fix: str = ""
) -> Iterator[None]:
    """Context for ``torch.load(path, weights_only=True)`` calls that turns refusals into :class:`ArtifactError`.

    The weights-only unpickler rebuilds only tensors and plain containers; any other Python object named in the
    file (a class, or a function such as ``os.system``) is refused before it is called, so loading runs no code.

    Args:
        path: The file being loaded (named in the message).
        safe_globals: Extra data-only classes to allow (:class:`torch.serialization.safe_globals`); never callables.
        fix: Advice appended to the message when objects are refused.
    """
    with torch.serialization.safe_globals(list(safe_globals)):
        try:
            yield
        except pickle.UnpicklingError as err:
            try:  # a static scan of the pickle opcodes lists every refused global and executes nothing
                refused = ", ".join(sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path)))
            except Exception:  # legacy (non-zip) file: name the first refusal from the message
                refused = ", ".join(re.findall(r"GLOBAL (\S+)", str(err))) or "unsupported pickle opcodes"
            raise ArtifactError(
                f"{path} contains non-tensor Python objects ({refused}) that could run code when unpickled; refused. "
                + (fix or f"If you made this file, re-save only tensors and plain data, or {REEXPORT_HINT}.")
            ) from None


def safe_torch_load(
    path: str | os.PathLike, map_location: Any = "cpu", *, safe_globals: Iterable[Any] = (), fix: str = ""
) -> Any:
    """``torch.load(path, weights_only=True)``; refused or unreadable files raise :class:`ArtifactError`.

    Args:
        path: A ``torch.save`` file.
        map_location: Passed to :func:`torch.load`.
        safe_globals: See :func:`refuse_unsafe_pickles`.
        fix: See :func:`refuse_unsafe_pickles`.
    """
    with refuse_unsafe_pickles(path, safe_globals, fix):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except (RuntimeError, EOFError, OSError) as err:  # a truncated zip: OSError [Errno 22] Invalid argument
            raise ArtifactError(f"{path} is not a readable torch.save file ({err}): it is truncated or corrupted") from None


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m foundation.artifacts", description="Verify or show an artifact.")
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="check manifest, file type and SHA-256, and load the tensors")
    verify.add_argument("path")
    verify.add_argument("--sha256", help="expected SHA-256 of model.safetensors")
    show = sub.add_parser("show", help="print the manifest and tensor table (headers only; hash not checked)")
    show.add_argument("path")
    args = parser.parse_args(argv)
    try:
        if args.command == "verify":
            art = load_artifact(args.path, args.sha256)
            for key in ("recipe", "created", "sha256", "num_tensors", "num_parameters", "metrics", "parents"):
                print(f"{key:15s} {json.dumps(art.manifest.get(key))}")
            print(f"OK {art.path}")
        else:
            _, manifest, model = _verify(args.path, check_hash=False)
            print(json.dumps(manifest, indent=2))
            with safetensors.safe_open(model, framework="pt") as f:
                for name in f.keys():
                    tensor = f.get_slice(name)
                    print(f"{name:60s} {tensor.get_dtype():8s} {tensor.get_shape()}")
    except ArtifactError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())
