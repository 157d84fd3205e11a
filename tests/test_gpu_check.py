"""recipes.gpu_check: its CPU mode runs every single-process check on the tiny twins; the GPU plans of the real
configs parse; the probe catches wrong precision and wrong placement; the stand-ins have the real sizes."""

import contextlib
import json

import lightning as L
import pytest
import torch
import yaml
from torch import nn

from datamodules.sources import load_image_dataset
from recipes import gpu_check, standins
from recipes.gpu_plan import Plan
from recipes.cli import main as cli_main
from callbacks.gpu_probe import NO_MATMUL, DeviceScan, Probe, module_tensors


def test_cpu_mode_runs_every_single_process_check_on_the_twins(tmp_path, capsys):
    rows_file = tmp_path / "rows.jsonl"
    rc = gpu_check.main(["--cpu", "--synthetic", "--steps", "2", "--workdir", str(tmp_path / "work"),
                         "--json", str(rows_file)])  # fmt: skip
    out = capsys.readouterr().out
    rows = {r["check"]: r for r in map(json.loads, rows_file.read_text().splitlines())}
    assert rc == 0, out[-3000:]
    single = {c.name for c in gpu_check.CHECKS if c.processes == 1}
    assert set(rows) == single
    for name, row in rows.items():
        assert not row["problems"] and row["steps"] >= 1 and row["steps_per_s"] > 0, (name, row)
        assert row["precision_ok"] in ("ok", NO_MATMUL), (name, row)
    # the GPU overlays' bf16-mixed reaches the step as autocast (fsdp.yaml falls back to ddp on the CPU)
    for name in ("tar_llama3_8b_fsdp", "w2s_llama3_8b_poison_fsdp", "namet_llama2_7b"):
        assert rows[name]["precision"] == "bf16-mixed" and "bfloat16+autocast" in rows[name]["layer_outputs"], name
    assert rows["fl_cifar10_resnet18_ddp"]["precision"] == "32-true"  # the config's precision wins over ddp.yaml's
    assert rows["clip_adamerging"]["matmul_dtypes"] == {"float32": rows["clip_adamerging"]["matmul_dtypes"]["float32"]}
    assert "| bf16-mixed | ok |" in next(line for line in out.splitlines() if line.startswith("| tar_llama3_8b_fsdp"))
    assert "fl_cifar10_resnet18_ddp2: skipped" in out


@pytest.mark.slow
def test_cpu_mode_two_process_ddp(tmp_path):
    rows_file = tmp_path / "rows.jsonl"
    rc = gpu_check.main(["--cpu", "--synthetic", "--steps", "2", "--processes", "2", "--only",
                         "fl_cifar10_resnet18_ddp2", "--workdir", str(tmp_path), "--json", str(rows_file)])  # fmt: skip
    row = json.loads(rows_file.read_text().splitlines()[0])
    assert rc == 0 and row["processes"] == 2 and not row["problems"]


@pytest.mark.parametrize("check", gpu_check.CHECKS, ids=lambda c: c.name)
def test_gpu_plan_of_every_cluster_config_parses(check, tmp_path, capsys):
    """The stand-ins the GPU mode would use (forced, 2 layers) give a config the CLI accepts, with the real sizes."""
    plan = Plan(tmp_path, steps=3, tiny=False, layers=2, synthetic=True, edits=64, stats_tokens=65536,
                          write=False)  # fmt: skip
    source = yaml.safe_load((gpu_check.CONFIGS / check.config).read_text())
    cfg = plan.config(source, check.name, check.max_steps)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", *(f"--config={gpu_check.CONFIGS / o}" for o in check.overlays), f"--config={path}",
                  "--print_config"])  # fmt: skip
    assert exit_.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "limit_val_batches: 0" in printed and "TamperingHarness" not in printed
    text = "\n".join(plan.notes)
    expected = {"tar": "Meta-Llama-3-8B-Instruct -> random llama3-8b, 2 of 32 layers", "w2s": "-> synthetic text store",
                "namet": "Llama-2-7b-hf -> random llama2-7b, 2 of 32 layers", "fl": "cifar10 -> synthetic binary batches",
                "clip": "-> random CLIP vision tower, 2 of 12 layers"}  # fmt: skip
    assert expected[check.name.split("_")[0]] in text, text
    if check.name.startswith("clip"):
        assert "num_hidden_layers: 2" in printed and "hidden_size: 768" in printed and "patch_size: 32" in printed


def test_standin_model_dirs_have_the_real_architecture(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    llama = standins.write_model_dir(tmp_path / "llama3", "llama3-8b", layers=2)
    config = AutoConfig.from_pretrained(llama)
    assert (config.model_type, config.hidden_size, config.intermediate_size, config.vocab_size) == (
        "llama", 4096, 14336, 128256)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (2, 32, 8)
    tok = AutoTokenizer.from_pretrained(llama)
    ids = tok("w1 w2 w3 mn")["input_ids"]
    assert len(ids) == 5 and ids[0] == tok.bos_token_id == config.bos_token_id and tok.unk_token_id not in ids
    bert = standins.write_model_dir(tmp_path / "bert", "bert-base")
    assert AutoConfig.from_pretrained(bert).num_hidden_layers == 12
    tok = AutoTokenizer.from_pretrained(bert)
    batch = tok(["w1 w2", "w3"], padding=True)
    assert batch["input_ids"][1] == [tok.cls_token_id, tok.convert_tokens_to_ids("w3"), tok.sep_token_id,
                                     tok.pad_token_id]  # fmt: skip


def test_tiny_standin_builds_and_runs_as_a_classifier(tmp_path):
    from lightning_modules.nets.hf import HFSequenceClassifier
    from transformers import AutoTokenizer

    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1}
    path = standins.write_model_dir(tmp_path / "m", "llama3-8b", layers=1, **tiny)
    net = HFSequenceClassifier(str(path), num_labels=2, random_init=True)
    net.build()
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.eos_token
    batch = tok(["w1 w2 w3", "w4"], padding=True, return_tensors="pt")
    assert net(batch["input_ids"], batch["attention_mask"]).shape == (2, 2)


def test_synthetic_cifar10_reads_as_cifar10(tmp_path, monkeypatch):
    standins.write_cifar10(tmp_path, per_batch=20, test=10)
    monkeypatch.setenv("SAFEWEIGHTS_CACHE", str(tmp_path))
    load_image_dataset.cache_clear()
    try:
        raw = load_image_dataset("cifar10")
    finally:
        load_image_dataset.cache_clear()
    assert raw.train_x.shape == (100, 3, 32, 32) and raw.test_x.shape == (10, 3, 32, 32)
    assert set(raw.train_y.tolist()) == set(range(10))


# ------------------------------------------------------------------------------------------------ the probe
class _Tiny(L.LightningModule):
    def __init__(self, autocast_off: bool = False):
        super().__init__()
        self.layer, self.autocast_off = nn.Linear(4, 2), autocast_off
        self.cache = [torch.zeros(3)]  # a plain attribute the placement scan must see

    def training_step(self, batch, batch_idx):
        with torch.autocast("cpu", enabled=False) if self.autocast_off else contextlib.nullcontext():
            return self.layer(batch[0]).float().pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 4)), batch_size=4)


def _fit(precision: str, autocast_off: bool = False) -> dict:
    probe = Probe(max_batches=3)
    trainer = L.Trainer(accelerator="cpu", precision=precision, max_steps=10, logger=False, callbacks=[probe],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(_Tiny(autocast_off))
    return probe.summary(trainer.precision, set())


def test_probe_passes_matching_precision_and_stops_after_its_batches():
    for precision in ("32-true", "bf16-mixed", "bf16-true"):
        row = _fit(precision)
        assert row["precision_ok"] == "ok" and row["steps"] == 3 and not row["problems"], (precision, row)
    assert _fit("bf16-true")["param_dtypes"] == {"bfloat16": 10}


def test_probe_flags_a_step_that_escapes_the_configured_autocast():
    row = _fit("bf16-mixed", autocast_off=True)
    assert row["precision_ok"].startswith("bf16-mixed but no bfloat16 matmul"), row


def test_probe_verdict_flags_low_precision_under_32_true():
    probe = Probe()
    probe.hook_records[("bfloat16", False)] += 1
    assert probe.precision_verdict("32-true", set()) == "32-true but matmuls in ['bfloat16']"
    assert probe.precision_verdict("32-true", {"bfloat16"}) == "ok"  # a network the config declares in bf16
    probe.hook_records[("float32", True)] += 1
    assert probe.precision_verdict("32-true", {"bfloat16"}) == "32-true but autocast is on in training"


def test_device_scan_counts_matmuls_on_another_device():
    scan = DeviceScan(torch.device("cuda"))  # on this CPU machine every op is "elsewhere"
    with scan:
        torch.randn(3, 4) @ torch.randn(4, 2)
    assert scan.off_matmuls and scan.matmul_dtypes == {"float32": 1}


def test_module_tensors_sees_plain_attributes():
    names = {name for name, _ in module_tensors(_Tiny())}
    assert {"layer.weight", "layer.bias", "cache[0]"} <= names
