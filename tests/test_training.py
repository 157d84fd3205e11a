"""Behaviour of the classifier recipe: it learns, poisoning plants a backdoor, resume and DDP are exact."""

import json
import os
import subprocess
import sys

import torch

from tests.helpers import REPO, TINY, artifact_of, run_cli

MNIST_TINY = str(TINY / "backdoor" / "mnist_badnets.yaml")
FULL_DIGITS = [  # the tiny twin without its step limits: ~1200 digits, 10 epochs, no per-epoch eval
    "--trainer.limit_train_batches=1.0",
    "--trainer.limit_val_batches=0",
    "--trainer.enable_checkpointing=false",
    "--trainer.max_epochs=10",
    "--data.init_args.train_size=null",
]


def _test_metrics(cli):
    """One dict of test metrics (``trainer.test`` returns one per dataloader: clean, then triggered)."""
    merged = {}
    for per_loader in cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False):
        merged.update(per_loader)
    return merged


def test_poisoning_raises_asr_and_keeps_accuracy(tmp_path):
    clean = run_cli("--config", MNIST_TINY, *FULL_DIGITS, "--data.init_args.poisoning.init_args.rate=0.0", root=tmp_path, name="clean")
    m_clean = _test_metrics(clean)
    poisoned = run_cli("--config", MNIST_TINY, *FULL_DIGITS, "--data.init_args.poisoning.init_args.rate=0.1", root=tmp_path, name="poisoned")
    m_poisoned = _test_metrics(poisoned)
    assert m_clean["test/acc"] > 0.85 and m_poisoned["test/acc"] > 0.85
    assert m_clean["test/asr"] < 0.3, "a clean model should not map the trigger to the target"
    assert m_poisoned["test/asr"] > 0.8, "10% poisoning should plant the backdoor"
    manifest = artifact_of(tmp_path, "poisoned").manifest
    assert manifest["poisoning"]["target_label"] == 0 and manifest["poisoning"]["trigger"]["type"] == "PixelPattern"


def test_training_loss_goes_down(tmp_path):
    cli = run_cli("--config", MNIST_TINY, *FULL_DIGITS, "--trainer.max_epochs=3", "--trainer.log_every_n_steps=1", root=tmp_path)
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    col = header.index("train/loss")
    losses = [float(r.split(",")[col]) for r in rows[1:] if r.split(",")[col]]
    assert len(losses) > 20
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def _weights(root, name):
    return artifact_of(root, name).state_dict


def test_resume_from_last_ckpt_matches_uninterrupted_run(tmp_path):
    args = ["--config", MNIST_TINY, "--trainer.limit_val_batches=1"]
    run_cli(*args, "--trainer.max_epochs=3", root=tmp_path, name="straight")
    run_cli(*args, "--trainer.max_epochs=1", root=tmp_path, name="interrupted")
    last = tmp_path / "interrupted" / "checkpoints" / "last.ckpt"
    assert last.exists() and last.with_name("last.ckpt.sha256").exists()
    run_cli(*args, "--trainer.max_epochs=3", f"--ckpt_path={last}", root=tmp_path, name="interrupted")
    straight, resumed = _weights(tmp_path, "straight"), _weights(tmp_path, "interrupted")
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


def test_ddp_two_processes_equal_one_process(tmp_path):
    """Two gloo processes with batch 16 each train the same model as one process with batch 32
    (the DataModule's sampler gives both the same global batches; no dropout or BN: the same averaged gradients)."""
    common = [
        "--config", MNIST_TINY, "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=1",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def launch(name, *extra):
        cmd = [sys.executable, "-m", "recipes", "fit", *common, *extra,
               f"--trainer.default_root_dir={tmp_path}", f"--run_name={name}"]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    launch("single", "--data.init_args.batch_size=32")
    launch("ddp", "--config", str(REPO / "configs" / "trainer" / "ddp_cpu.yaml"), "--data.init_args.batch_size=16")
    single, ddp = _weights(tmp_path, "single"), _weights(tmp_path, "ddp")
    manifest = json.loads((tmp_path / "ddp" / "artifact" / "manifest.json").read_text())
    assert "devices: 2" in manifest["config"] and "strategy: ddp" in manifest["config"]
    for k in single:
        assert torch.allclose(single[k], ddp[k], atol=1e-6, rtol=1e-5), k
