"""Readable runs: plain progress lines when stdout is not a terminal, the final metrics table, the silenced
adverts and warnings (recipes/quiet.py), the top-level --help, and the TensorBoard trainer overlay."""

import io
import logging
import warnings
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from callbacks.progress import FinalMetrics, LineProgress, install, metrics_table
from recipes.cli import main
from recipes.quiet import silence

TINY_FL = "tests/configs/fl/mnist_fedavg_naive.yaml"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("bar", [RichProgressBar, TQDMProgressBar])
def test_install_swaps_the_default_bar_only_when_stdout_is_not_a_terminal(bar):
    piped = install(L.Trainer(callbacks=[bar()], logger=False), stream=io.StringIO())
    assert isinstance(piped.progress_bar_callback, LineProgress)
    assert sum(isinstance(c, FinalMetrics) for c in piped.callbacks) == 1
    tty = install(L.Trainer(callbacks=[bar()], logger=False), stream=_Tty())
    assert type(tty.progress_bar_callback) is bar
    off = install(L.Trainer(enable_progress_bar=False, logger=False), stream=io.StringIO())
    assert off.progress_bar_callback is None and any(isinstance(c, FinalMetrics) for c in off.callbacks)


def test_metrics_table_lists_every_metric_aligned():
    table = metrics_table({"train/loss": 0.123456, "val/acc": 0.5, "val/asr": float("nan")}, "final")
    assert table.splitlines() == [
        "final",
        "  metric      value",
        "  ----------  ----------",
        "  train/loss  0.1235",
        "  val/acc     0.5",
        "  val/asr     nan",
    ]


def test_redirected_fit_prints_one_line_per_epoch_and_the_final_table(in_tmp, capsys, monkeypatch):
    import sys

    root = Path(__file__).resolve().parents[1]
    monkeypatch.setattr("sys.stdout", io.StringIO())  # not a terminal, as in a CI log or `> run.log`

    cli = main(["fit", f"--config={root / TINY_FL}", "--trainer.enable_progress_bar=true",
                "--trainer.default_root_dir=runs", "--run_name=r"])  # fmt: skip
    out = sys.stdout.getvalue()
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    # 4 rounds at 2 rounds per epoch: two lines, each with the rounds done and the epoch's validation metrics
    assert [line.split(" | ")[1] for line in epoch_lines] == ["round 2/4", "round 4/4"]
    assert all("val/acc" in line and "val/asr" in line for line in epoch_lines)
    table = out[out.index("final metrics of fit (2 epochs, 4 rounds"):]
    final_acc = float(cli.trainer.callback_metrics["val/acc"])
    assert any(line.split() == ["val/acc", f"{final_acc:.4g}"] for line in table.splitlines())
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)  # as a reproduction stage does
    assert "final metrics after test" in sys.stdout.getvalue()
    assert "Tip:" not in capsys.readouterr().err


def test_silence_drops_known_warnings_and_adverts_but_not_others(caplog):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("an unexpected warning", UserWarning)
    assert [str(w.message) for w in caught] == ["an unexpected warning"]
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=log.name):
        log.info("💡 Tip: For seamless cloud logging ...")
        log.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]


def test_top_level_help_names_methods_reproduce_and_configs(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m recipes")
    for needle in ["FederatedRecipe", "NAMET", "python -m recipes.reproduce", "backdoor", "configs/trainer/",
                   "tensorboard", "tests/configs/"]:  # fmt: skip
        assert needle in out, needle


def test_tensorboard_overlay_writes_event_files_beside_csv(in_tmp):
    root = Path(__file__).resolve().parents[1]
    main(["fit", f"--config={root / TINY_FL}", f"--config={root / 'configs/trainer/tensorboard.yaml'}",
          "--trainer.default_root_dir=runs/tb", "--run_name=s0"])  # fmt: skip
    assert "val/acc" in (in_tmp / "runs/tb/csv/s0/metrics.csv").read_text().splitlines()[0].split(",")
    events = list((in_tmp / "runs/tb/tb/s0").glob("events.out.tfevents.*"))
    assert len(events) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    assert {"val/acc", "val/asr"} <= set(acc.Tags()["scalars"])


def test_reproduce_writes_under_runs_unless_out_is_given(monkeypatch):
    import recipes.reproduce as module

    calls = []
    monkeypatch.setattr(module, "reproduce", lambda name, seeds, root, out, *rest: calls.append((root, out)))
    module.main(["backdoor"])
    module.main(["backdoor", "--root", "runs/x"])
    module.main(["backdoor", "--out", "docs/results"])
    assert calls == [(Path("runs/reproduce"), Path("runs/reproduce")), (Path("runs/x"), Path("runs/x")),
                     (Path("runs/reproduce"), Path("docs/results"))]  # fmt: skip


def test_demo_is_the_fl_job_shortened_with_both_arms(monkeypatch):
    """`make demo`: the config of `fl`'s stages with 30 rounds and the attack in rounds 15-24, FedAvg vs norm clip."""
    from recipes.reproduce import _substitute, load_comparisons

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # the stages' overlay paths are relative to the repository, as run_stage uses them
    demo = load_comparisons()["demo"]
    aggregators = []
    for stage in demo.stages:
        args = [f"--config={root / 'configs' / stage.config}", *[_substitute(a, 0, Path("runs")) for a in stage.overrides]]
        cli = main(args, run=False)
        assert cli.trainer.max_steps == 30
        attack = cli.model.attack
        assert (attack.schedule.start_round, attack.schedule.end_round, attack.schedule.malicious_clients) == (15, 25, [0])
        aggregators.append(type(cli.model.aggregator).__name__)
    assert aggregators == ["FedAvg", "NormClipping"]
