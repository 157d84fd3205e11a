"""CIFAR-10 for the cluster config, offline: the binary-format parser, the safe download/extraction, the 3-channel
data path of the federated DataModule, the CIFAR ResNet-18's features/head split, and the GPU config itself run on
CPU over a synthetic CIFAR-format cache."""

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from datamodules import FederatedDataModule, PixelPattern, Poisoning
from datamodules.sources import load_image_dataset
from lightning_modules.nets import CifarResNet18
from foundation import assets
from tests.helpers import CONFIGS, run_cli

MEMBERS = assets.CIFAR10_MEMBERS


def cifar_records(n: int, seed: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    """``n`` CIFAR binary records built plane by plane (label byte, 1024 red, 1024 green, 1024 blue bytes)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    planes = rng.integers(0, 256, (n, 3, 32, 32)).astype(np.uint8)
    data = b"".join(bytes([labels[i]]) + planes[i, 0].tobytes() + planes[i, 1].tobytes() + planes[i, 2].tobytes()
                    for i in range(n))  # fmt: skip
    return data, planes, labels.astype(np.int64)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty asset cache; ``load_image_dataset`` forgets what it loaded before and after."""
    monkeypatch.setenv("SAFEWEIGHTS_CACHE", str(tmp_path / "cache"))
    load_image_dataset.cache_clear()
    yield tmp_path / "cache"
    load_image_dataset.cache_clear()


@pytest.fixture
def synthetic_cifar(fresh_cache):
    """A CIFAR-format cache: 5 train batches of 40 records and a test batch of 30."""
    directory = assets.cifar10_dir()
    directory.mkdir(parents=True)
    truth = {}
    for k, member in enumerate(MEMBERS):
        data, planes, labels = cifar_records(30 if "test" in member else 40, seed=k)
        (directory / Path(member).name).write_bytes(data)
        truth[Path(member).name] = (planes, labels)
    return truth


def write_tar(path: Path, members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, link in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, link
            tar.addfile(info)
    return path


# ------------------------------------------------------------------------------------------ binary format
def test_binary_parser_round_trips_labels_and_channel_major_pixels(tmp_path):
    data, planes, labels = cifar_records(7, seed=1)
    path = tmp_path / "data_batch_1.bin"
    path.write_bytes(data)
    images, got_labels = assets.read_cifar_bin(path)
    assert images.shape == (7, 3, 32, 32) and images.dtype == np.uint8
    np.testing.assert_array_equal(got_labels, labels)
    np.testing.assert_array_equal(images, planes)  # red plane first, then green, then blue, each row-major


def test_binary_parser_rejects_truncated_and_non_cifar10_files(tmp_path):
    data, _, _ = cifar_records(2, seed=0)
    (tmp_path / "short.bin").write_bytes(data[:-1])
    with pytest.raises(ValueError, match="not a multiple"):
        assets.read_cifar_bin(tmp_path / "short.bin")
    (tmp_path / "c100.bin").write_bytes(bytes([57]) + data[1 : assets.CIFAR10_RECORD])
    with pytest.raises(ValueError, match="out of range"):
        assets.read_cifar_bin(tmp_path / "c100.bin")


def test_missing_cifar10_names_the_download_command(fresh_cache):
    with pytest.raises(assets.AssetNotFoundError, match="python -m foundation.assets download cifar10"):
        load_image_dataset("cifar10")
    assert "absent" in _list_output()  # `list` reports it without failing


def _list_output() -> str:
    import contextlib

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert assets.main(["list"]) == 0
    return out.getvalue()


def test_load_image_dataset_reads_the_canonical_splits(synthetic_cifar):
    raw = load_image_dataset("cifar10")
    assert raw.train_x.shape == (200, 3, 32, 32) and raw.test_x.shape == (30, 3, 32, 32) and raw.num_classes == 10
    planes, labels = synthetic_cifar["data_batch_2.bin"]
    assert torch.equal(raw.train_x[40:80], torch.from_numpy(planes))  # batches 1..5 in order
    assert torch.equal(raw.train_y[40:80], torch.from_numpy(labels))
    assert torch.equal(raw.test_y, torch.from_numpy(synthetic_cifar["test_batch.bin"][1]))


# ------------------------------------------------------------------------------------------ download, extraction
@pytest.mark.parametrize("evil", ["../evil.bin", "cifar-10-batches-bin/../../evil.bin", "/tmp/evil.bin"])
def test_extraction_refuses_a_path_traversal_member(tmp_path, evil):
    good, _, _ = cifar_records(1, seed=0)
    members = {**{m: good for m in MEMBERS[:2]}, evil: b"x", **{m: good for m in MEMBERS[2:]}}  # evil in the middle
    archive = write_tar(tmp_path / "a.tar.gz", members)
    target = tmp_path / "out" / "cifar-10-batches-bin"
    with pytest.raises(ValueError, match="unsafe member"):
        assets.extract_cifar10(archive, target)
    assert not target.exists() and not (tmp_path / "evil.bin").exists()
    assert list((tmp_path / "out").iterdir()) == []  # the scratch directory is gone too


def test_extraction_refuses_a_symlink_at_an_expected_name(tmp_path):
    good, _, _ = cifar_records(1, seed=0)
    archive = write_tar(tmp_path / "a.tar.gz", {m: good for m in MEMBERS[1:]}, {MEMBERS[0]: "/etc/passwd"})
    with pytest.raises(ValueError, match="not a regular file"):
        assets.extract_cifar10(archive, tmp_path / "out" / "bin")


def test_extraction_writes_only_the_six_batches(tmp_path):
    data, planes, labels = cifar_records(3, seed=5)
    extra = {"cifar-10-batches-bin/batches.meta.txt": b"airplane\n", "cifar-10-batches-bin/readme.html": b"<html>"}
    archive = write_tar(tmp_path / "a.tar.gz", {**{m: data for m in MEMBERS}, **extra})
    target = assets.extract_cifar10(archive, tmp_path / "out" / "cifar-10-batches-bin")
    assert sorted(p.name for p in target.iterdir()) == sorted(Path(m).name for m in MEMBERS)
    images, got = assets.read_cifar_bin(target / "test_batch.bin")
    np.testing.assert_array_equal(images, planes)
    np.testing.assert_array_equal(got, labels)


def test_download_checks_size_and_md5_before_extracting(tmp_path, fresh_cache, capsys):
    import hashlib

    data, _, _ = cifar_records(1, seed=0)
    archive = write_tar(tmp_path / "cifar-10-binary.tar.gz", {m: data for m in MEMBERS})
    digest = hashlib.md5(archive.read_bytes()).hexdigest()
    assets.verify_archive(archive, digest, archive.stat().st_size)  # the right digest passes
    with pytest.raises(ValueError, match="md5"):
        assets.verify_archive(archive, "0" * 32, archive.stat().st_size)
    with pytest.raises(ValueError, match="expected 170052171"):  # the real archive's size and md5 are required
        assets.download_cifar10(archive)
    assert assets.main(["download", "cifar10", "--archive", str(archive)]) == 1
    assert "expected 170052171" in capsys.readouterr().err and not assets.cifar10_dir().exists()
    assert assets.main(["download", "cifar10", "--url", "http://example.org/cifar-10-binary.tar.gz"]) == 1
    assert "non-https" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ 3-channel data path
def test_pixel_pattern_stamps_every_channel():
    trigger = PixelPattern()
    images = torch.rand(2, 3, 32, 32) * 0.5
    out = trigger(images)
    mask = torch.zeros(32, 32, dtype=torch.bool)
    for dh, dw in trigger.offsets:
        mask[32 - dh, 32 - dw] = True
    assert mask.sum() == 4
    assert (out[:, :, mask] == 1.0).all()  # all three channels of the four pixels
    assert torch.equal(out[:, :, ~mask], images[:, :, ~mask])
    gray = trigger(images[:, :1])  # the 1-channel result is the same as one channel of the 3-channel one
    assert torch.equal(gray, out[:, :1])


def test_grayscale_pixels_are_bit_identical_to_the_previous_conversion():
    u8 = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    assert torch.equal(FederatedDataModule.pixels(u8), u8.float().div_(255.0).unsqueeze(1))
    rgb = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    assert FederatedDataModule.pixels(rgb).shape == (5, 3, 32, 32)


def test_federated_cifar10_clients_hold_3_channel_images_and_poisoning_stamps_all_channels(synthetic_cifar):
    poisoning = Poisoning(PixelPattern(), target_label=2)
    dm = FederatedDataModule("cifar10", num_clients=4, partition="iid", poisoning=poisoning)
    dm.setup("fit")
    x, y = dm.client_data(0)
    assert x.shape[1:] == (3, 32, 32) and len(x) == 50
    assert abs(float(dm.train_x.mean())) < 1e-4 and abs(float(dm.train_x.std()) - 1) < 1e-3
    xp, yp = dm.poison_batch(x, y, 0.5)
    pix = dm.denormalize(xp[:25])
    for dh, dw in PixelPattern().offsets:
        assert torch.allclose(pix[:, :, 32 - dh, 32 - dw], torch.ones(25, 3), atol=1e-5)
    assert (yp[:25] == 2).all() and torch.equal(xp[25:], x[25:])
    triggered_x = dm.val_sets[1].tensors[0]
    assert triggered_x.shape[1:] == (3, 32, 32)


# ------------------------------------------------------------------------------------------ the network
def test_resnet_features_and_head_compose_to_forward():
    net = CifarResNet18(num_classes=7, in_channels=3, base_width=4)
    x = torch.randn(3, 3, 32, 32)
    for mode in (net.eval, net.train):
        mode()
        torch.manual_seed(0)
        feats = net.features(x)
        assert feats.shape == (3, 32) and isinstance(net.head, nn.Linear)
        assert net.head.in_features == 32 and net.head.out_features == 7
        assert torch.allclose(net.head(feats), net(x), atol=1e-6)


def test_resnet_is_the_cifar_variant_with_configurable_widths():
    net = CifarResNet18()  # default: the standard ResNet-18 widths
    assert [getattr(net, f"layer{i}")[-1].conv2.out_channels for i in range(1, 5)] == [64, 128, 256, 512]
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1) and net.conv1.in_channels == 3
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    assert sum(isinstance(m, nn.Module) and type(m).__name__ == "BasicBlock" for m in net.modules()) == 8
    narrow = CifarResNet18(in_channels=1, base_width=32)  # Chameleon's official widths, on 28x28 digits
    assert narrow.layer4[-1].conv2.out_channels == 256 and narrow(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="base_width"):
        CifarResNet18(base_width=0)


def test_gpu_config_runs_on_cpu_over_a_synthetic_cifar_cache(synthetic_cifar, tmp_path):
    """The cluster config itself (CIFAR-10, 3-channel ResNet, Chameleon) for two attack rounds on CPU, shrunk."""
    cli = run_cli(
        "--config", str(CONFIGS / "chameleon" / "cifar10_resnet18_normclip.yaml"),
        "--trainer.accelerator=cpu", "--trainer.max_steps=2", "--trainer.enable_progress_bar=false",
        "--model.init_args.net.init_args.base_width=2", "--model.init_args.clients_per_round=3",
        "--model.init_args.attack.init_args.contrastive_epochs=1", "--model.init_args.attack.init_args.head_epochs=1",
        "--model.init_args.local.init_args.local_epochs=1", "--data.init_args.num_clients=5",
        "--data.init_args.partition=iid", root=tmp_path,
    )  # fmt: skip
    assert cli.trainer.global_step == 2 and cli.datamodule.train_x.shape[1:] == (3, 32, 32)
    assert cli.model.net.conv1.in_channels == 3 and cli.datamodule.target_label == 2
    assert float(cli.trainer.callback_metrics["round/attack_active"]) == 1.0
    assert torch.isfinite(cli.trainer.callback_metrics["val/acc"])
    bn = cli.model.net.bn1.running_var
    assert not torch.equal(bn, torch.ones_like(bn))  # the clients' BatchNorm statistics reached the global model


def test_imagenet_resnet18_has_torchvisions_size_and_loads_torchvision_names_without_the_head(tmp_path):
    """``ResNet18`` is torchvision's resnet18 (11,689,512 parameters with 1000 classes); a state dict in
    torchvision's names (``downsample``, ``fc``) loads into it, every weight but the new head."""
    from safetensors.torch import save_file

    from lightning_modules.nets.resnet import ResNet18

    assert sum(p.numel() for p in ResNet18(num_classes=1000).parameters()) == 11_689_512
    torch.manual_seed(1)
    source = ResNet18(num_classes=1000)
    tv = {k.replace(".shortcut.", ".downsample.").replace("head.", "fc.", 1): v.contiguous()
          for k, v in source.state_dict().items()}  # fmt: skip
    assert "layer2.0.downsample.0.weight" in tv and "fc.weight" in tv and "conv1.weight" in tv
    save_file(tv, str(tmp_path / "resnet18.safetensors"))
    torch.manual_seed(2)
    loaded = ResNet18(num_classes=10, weights=str(tmp_path / "resnet18.safetensors")).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded.features(x), source.eval().features(x))
    assert loaded(x).shape == (2, 10)
    assert loaded.stem(x).shape == (2, 64, 16, 16)  # 7x7 stride 2, then max-pool stride 2
    with pytest.raises(ValueError, match="not a torchvision ResNet-18 of this width"):
        ResNet18(num_classes=10, base_width=32, weights=str(tmp_path / "resnet18.safetensors"))
