"""Safe artifacts, atomic writes, SafeCheckpointIO and the ExportArtifact callback."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import safetensors.torch
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks.artifact import ExportArtifact
from foundation import artifacts
from foundation.artifacts import (
    ArtifactError,
    atomic_write_text,
    load_artifact,
    parent_record,
    safe_torch_load,
    save_artifact,
    sha256_file,
)
from foundation.checkpoint_io import SafeCheckpointIO, load_module_from_checkpoint

# torch 2.13 raises this as a FutureWarning; the pyproject filter only covers DeprecationWarning
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty"),  # resuming is the point
]


class Payload:
    """Unpickling this calls ``open(marker, "w")``: stands in for any code a malicious pickle would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class Tiny(pl.LightningModule):
    def __init__(self, hidden: int = 4, lr: float = 0.1, name: str = "tiny", layers: list[int] = [1, 2],
                 opts: dict | None = None, data_dir: Path | None = None, backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        self.net = backbone or nn.Linear(hidden, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def test_step(self, batch, batch_idx):
        self.log("test_loss", nn.functional.mse_loss(self.net(batch[0]), batch[1]))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1)]


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)), batch_size=4)


def trainer(root: Path, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", max_epochs=1, enable_progress_bar=False, enable_model_summary=False,
                    logger=False, default_root_dir=root, log_every_n_steps=1)
    return pl.Trainer(**{**defaults, **kwargs})


def state() -> dict[str, torch.Tensor]:
    weight = torch.arange(12.0).reshape(3, 4)
    return {"emb.weight": weight, "head.weight": weight, "t": weight.t(), "b": torch.ones(3, dtype=torch.int64)}


# --- artifacts -------------------------------------------------------------------------------------------------


def test_round_trip_with_tied_tensors_and_manifest(tmp_path):
    manifest = {"recipe": "x.Y", "metrics": {"acc": torch.tensor(0.5), "n": np.int64(3)}, "src": tmp_path / "a"}
    out = save_artifact(tmp_path / "art", state(), manifest)
    art = load_artifact(out)
    assert art.path == out and set(art.state_dict) == set(state())
    for name, tensor in state().items():
        assert torch.equal(art.state_dict[name], tensor)
    m = art.manifest
    assert m["format"] == "safeweights-artifact/1" and m["model_file"] == "model.safetensors"
    assert m["sha256"] == art.sha256 == sha256_file(out / "model.safetensors")
    assert m["num_tensors"] == 4 and m["num_parameters"] == 12 * 3 + 3
    assert m["metrics"] == {"acc": 0.5, "n": 3} and m["src"] == str(tmp_path / "a") and m["created"].endswith("+00:00")
    for path in (out, out / "model.safetensors", out / "manifest.json"):  # the usual permissions, not mkstemp's 0600
        assert path.stat().st_mode & 0o777 == (0o777 if path.is_dir() else 0o666) & ~artifacts._UMASK
    # the same artifact is found from its manifest and from the run dir holding `artifact/`
    save_artifact(tmp_path / "run" / "artifact", state(), {})
    assert load_artifact(out / "manifest.json").sha256 == art.sha256
    assert load_artifact(tmp_path / "run").path == tmp_path / "run" / "artifact"
    assert parent_record(out) == {"path": str(out.resolve()), "sha256": art.sha256, "recipe": "x.Y"}


def test_manifest_must_be_json(tmp_path):
    with pytest.raises(ArtifactError, match=r"'extra\.fn'.*not JSON-serializable"):
        save_artifact(tmp_path / "art", state(), {"extra": {"fn": print}})
    with pytest.raises(ArtifactError, match=r"state_dict\['x'\] is a str"):
        save_artifact(tmp_path / "art", {"x": "not a tensor"}, {})
    assert not list(tmp_path.iterdir())


def test_missing_artifact_names_the_fix(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist.*save_artifact"):
        load_artifact(tmp_path / "nope")


def flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_tampering_is_detected(tmp_path):
    out = save_artifact(tmp_path / "art", state(), {})
    good = load_artifact(out).sha256
    with pytest.raises(ArtifactError, match="hash mismatch.*expected"):
        load_artifact(out, expected_sha256="0" * 64)
    assert load_artifact(out, expected_sha256=f"sha256:{good.upper()}").sha256 == good

    flip_byte(out / "model.safetensors")
    with pytest.raises(ArtifactError, match="hash mismatch: the file was modified or corrupted"):
        load_artifact(out)

    flip_byte(out / "model.safetensors")  # restore, then edit the manifest's hash instead
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["sha256"] = "f" * 64
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="hash mismatch"):
        load_artifact(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_artifact(out)


def write_pickle(obj, path: Path) -> None:
    path.write_bytes(pickle.dumps(obj))


@pytest.mark.parametrize("write", [torch.save, write_pickle], ids=["zip", "pickle"])
def test_pickle_disguised_as_safetensors_is_refused(tmp_path, write):
    out = save_artifact(tmp_path / "art", state(), {})
    model = out / "model.safetensors"
    write(state(), model)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["sha256"] = sha256_file(model)  # even with a matching hash
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="pickle.*refused.*safetensors"):
        load_artifact(out)


def test_safetensors_whose_header_length_starts_with_the_pickle_byte_loads(tmp_path):
    """A header of 128 + 256k bytes makes the file start with 0x80, a pickle's first byte: still safetensors."""
    for n in range(1, 200):  # grow the header (key names) until its length's low byte is 0x80
        tensors = {f"layer_{i}.weight": torch.full((2,), float(i)) for i in range(n)}
        out = save_artifact(tmp_path / f"art{n}", tensors, {})
        if (out / "model.safetensors").read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("no header length with low byte 0x80 was produced")
    loaded = load_artifact(out).state_dict
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_safe_torch_load_never_runs_pickled_code(tmp_path, legacy):
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Payload(marker)))  # the payload is real: plain unpickling runs it
    assert marker.exists()
    marker.unlink()

    evil = tmp_path / "evil.pt"
    if legacy:
        evil.write_bytes(pickle.dumps({"w": Payload(marker)}, protocol=2))  # what torch.save used to write
    else:
        torch.save({"w": torch.ones(2), "x": Payload(marker)}, evil)
    with pytest.raises(ArtifactError, match=r"evil\.pt contains non-tensor Python objects \(io\.open\).*refused"):
        safe_torch_load(evil)
    assert not marker.exists()

    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    assert torch.equal(safe_torch_load(tmp_path / "ok.pt")["w"], torch.ones(2))


def test_failed_save_keeps_the_old_artifact(tmp_path, monkeypatch):
    out = save_artifact(tmp_path / "art", state(), {"v": 1})
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def partial_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{trunc")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", partial_write)
    with pytest.raises(OSError, match="disk full"):
        save_artifact(out, {"other": torch.zeros(5)}, {"v": 2})
    monkeypatch.undo()

    real_replace = artifacts.os.replace  # fail the final swap: the old artifact must be put back

    def failing_replace(src, dst):
        if ".tmp-" in str(src) and Path(src).is_dir():
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(artifacts.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        save_artifact(out, {"other": torch.zeros(5)}, {"v": 2})

    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert load_artifact(out).manifest["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no temp or set-aside dirs left behind


def test_overwrite_replaces_artifact_but_never_other_dirs(tmp_path):
    out = save_artifact(tmp_path / "art", state(), {"v": 1})
    save_artifact(out, {"x": torch.zeros(2)}, {"v": 2})
    assert load_artifact(out).manifest["v"] == 2 and [p.name for p in tmp_path.iterdir()] == ["art"]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("precious")
    with pytest.raises(ArtifactError, match="not an artifact; refusing to replace it"):
        save_artifact(tmp_path / "run", state(), {})
    assert (tmp_path / "run" / "notes.txt").read_text() == "precious"


def test_atomic_write_keeps_old_content_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")
    monkeypatch.setattr(artifacts.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("io error")))
    with pytest.raises(OSError, match="io error"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_cli_verify(tmp_path, capsys):
    out = save_artifact(tmp_path / "art", state(), {"recipe": "x.Y"})
    assert artifacts._main(["verify", str(out)]) == 0
    assert "OK" in capsys.readouterr().out
    assert artifacts._main(["show", str(out)]) == 0
    assert "head.weight" in capsys.readouterr().out
    flip_byte(out / "model.safetensors")
    assert artifacts._main(["verify", str(out)]) == 1
    assert "hash mismatch" in capsys.readouterr().err


# --- SafeCheckpointIO ------------------------------------------------------------------------------------------


@pytest.fixture
def last_ckpt(tmp_path) -> Path:
    model = Tiny(opts={"a": [1.5, None]}, data_dir=tmp_path / "data", backbone=nn.Linear(4, 1))
    ckpt = ModelCheckpoint(save_last=True)  # default dirpath, <root>/checkpoints, as resuming trainers use
    trainer(tmp_path, plugins=[SafeCheckpointIO()], callbacks=[ckpt], limit_train_batches=2).fit(model, loader())
    return tmp_path / "checkpoints" / "last.ckpt"


def test_checkpoints_are_written_with_sidecar_and_resume(tmp_path, last_ckpt):
    sidecar = last_ckpt.with_name("last.ckpt.sha256")
    assert sidecar.read_text() == f"{sha256_file(last_ckpt)}  last.ckpt\n"
    loaded = SafeCheckpointIO().load_checkpoint(last_ckpt)
    assert loaded["hyper_parameters"]["data_dir"] == tmp_path / "data"  # pathlib.Path is allowed

    resumed = trainer(tmp_path, plugins=[SafeCheckpointIO()], max_epochs=2, limit_train_batches=2)
    resumed.fit(Tiny(), loader(), ckpt_path=last_ckpt)
    assert resumed.global_step == 4
    # every checkpoint has its sidecar; the replaced epoch=0 checkpoint took its sidecar along; no temp files
    names = sorted(p.name for p in last_ckpt.parent.iterdir())
    assert names == ["epoch=1-step=4.ckpt", "epoch=1-step=4.ckpt.sha256", "last.ckpt", "last.ckpt.sha256"]

    model = load_module_from_checkpoint(Tiny, last_ckpt)
    assert model.hparams.opts == {"a": [1.5, None]}
    with pytest.raises(ValueError, match="always loads with weights_only=True"):
        SafeCheckpointIO().load_checkpoint(last_ckpt, weights_only=False)


def test_modified_checkpoint_is_refused(tmp_path, last_ckpt):
    flip_byte(last_ckpt, offset=len(last_ckpt.read_bytes()) // 2)
    with pytest.raises(ArtifactError, match="hash mismatch.*modified or corrupted"):
        trainer(tmp_path, plugins=[SafeCheckpointIO()], max_epochs=2).fit(Tiny(), loader(), ckpt_path=last_ckpt)
    with pytest.raises(ArtifactError, match="hash mismatch"):
        load_module_from_checkpoint(Tiny, last_ckpt)


def test_checkpoint_with_pickled_code_is_refused(tmp_path, last_ckpt):
    marker = tmp_path / "pwned"
    checkpoint = SafeCheckpointIO().load_checkpoint(last_ckpt)
    checkpoint["hyper_parameters"]["hidden"] = Payload(marker)
    evil = tmp_path / "evil.ckpt"
    SafeCheckpointIO().save_checkpoint(checkpoint, evil)  # a matching sidecar does not make it trusted
    with pytest.raises(ArtifactError, match=r"io\.open.*refused.*untrusted or was written by a different tool"):
        trainer(tmp_path, plugins=[SafeCheckpointIO()], max_epochs=2).fit(Tiny(), loader(), ckpt_path=evil)
    with pytest.raises(ArtifactError, match=r"io\.open"):
        load_module_from_checkpoint(Tiny, evil)
    assert not marker.exists()


def test_checkpoint_io_edge_cases(tmp_path):
    io = SafeCheckpointIO()
    io.save_checkpoint({"w": torch.ones(1)}, tmp_path / "a.ckpt")
    (tmp_path / "last.ckpt").symlink_to("a.ckpt")
    assert torch.equal(io.load_checkpoint(tmp_path / "last.ckpt")["w"], torch.ones(1))  # target's sidecar
    io.save_checkpoint({"w": torch.zeros(1)}, tmp_path / "last.ckpt")  # replaces the link, not its target
    assert torch.equal(io.load_checkpoint(tmp_path / "a.ckpt")["w"], torch.ones(1))
    assert torch.equal(io.load_checkpoint(tmp_path / "last.ckpt")["w"], torch.zeros(1))
    with pytest.raises(FileNotFoundError):
        io.load_checkpoint(tmp_path / "missing.ckpt")
    with pytest.raises(ArtifactError, match="URL.*download it first"):
        io.load_checkpoint("https://example.com/x.ckpt")


# --- ExportArtifact --------------------------------------------------------------------------------------------


class Exported(Tiny):
    def artifact_metadata(self) -> dict:
        return {"trigger": "cf", "target": 1}

    def artifact_parents(self) -> list[dict]:
        return [{"path": "/p", "sha256": "0" * 64, "recipe": None}]


def test_export_artifact_on_fit_and_test_end(tmp_path):
    (tmp_path / "config.yaml").write_text("model: {}\n")  # where LightningCLI's SaveConfigCallback puts it
    model, callback = Exported(), ExportArtifact()
    trainer(tmp_path, callbacks=[callback], limit_train_batches=2).fit(model, loader())
    assert callback.last_path == tmp_path / "artifact"
    art = load_artifact(tmp_path)
    assert all(torch.equal(art.state_dict[k], v) for k, v in model.state_dict().items())
    m = art.manifest
    assert m["recipe"] == f"{__name__}.Exported" and m["config"] == "model: {}\n"
    assert set(m["metrics"]) == {"train_loss"} and m["trigger"] == "cf" and m["target"] == 1
    assert m["parents"][0]["sha256"] == "0" * 64

    callback = ExportArtifact(dirname="tested", on="test_end")
    trainer(tmp_path, callbacks=[callback]).test(Tiny(), loader())
    assert "test_loss" in load_artifact(callback.last_path).manifest["metrics"]
    with pytest.raises(ValueError, match="on='fit_end' or on='test_end'"):
        ExportArtifact(on="predict_end")
