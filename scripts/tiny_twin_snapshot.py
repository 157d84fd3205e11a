"""Behaviour check for refactors: run tiny twins on their fixed seed and write their final metrics and a sha256 of
the exported weights, so a tree before and after a change can be compared exactly.

    PYTHONPATH=$PWD python scripts/tiny_twin_snapshot.py before.json          # on the old tree
    PYTHONPATH=$PWD python scripts/tiny_twin_snapshot.py after.json           # on the new tree, then diff them
    PYTHONPATH=$PWD python scripts/tiny_twin_snapshot.py out.json fl_pgd tar  # a subset
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from recipes.cli import main  # noqa: E402

T, C = Path("tests/configs"), Path("configs")
RUNS = {
    "fl_naive": [T / "fl/mnist_fedavg_naive.yaml"],
    **{f"fl_{a}": [T / "fl/mnist_fedavg_naive.yaml", C / f"fl/attacks/{a}.yaml"]
       for a in ("pgd", "neurotoxin", "chameleon", "none")},  # fmt: skip
    "fl_flame": [T / "fl/mnist_fedavg_naive.yaml", C / "fl/defenses/flame.yaml"],
    "chameleon_mnist": [T / "chameleon/mnist_normclip.yaml"],
    "backdoor_mnist": [T / "backdoor/mnist_badnets.yaml"],
    "backdoor_minilm": [T / "backdoor/rt_minilm_badnet.yaml"],
    "backdoor_insent": [T / "backdoor/rt_minilm_insent.yaml"],
    "backdoor_lora": [T / "backdoor/rt_smollm2_lora_badnet.yaml"],
    "fedselect": [T / "fedselect/mnist_fedselect.yaml"],
    "ditto": [T / "fedselect/mnist_ditto.yaml"],
    "fedavg_ft": [T / "fedselect/mnist_fedavg_ft.yaml"],
    "trojandam": [T / "trojandam/mnist_continuous.yaml"],
    "trojandam_testbed": [T / "trojandam/testbed.yaml", C / "fl/defenses/trojandam.yaml"],
    "tar": [T / "tar/smollm2_tar.yaml"],
    "tar_ga": [T / "tar/smollm2_gradient_ascent.yaml"],
    "tar_rm": [T / "tar/smollm2_random_mapping.yaml"],
}


def snapshot(name: str) -> dict:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        args = [a for c in RUNS[name] for a in ("--config", str(c))]
        cli = main(["fit", *args, f"--trainer.default_root_dir={d}", "--run_name=run"])
        test = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
        metrics = {k: float(v) for k, v in sorted(cli.trainer.callback_metrics.items()) if v.numel() == 1}
        state = cli.model.artifact_state_dict()
        h = hashlib.sha256()
        for k in sorted(state):
            h.update(k.encode())
            h.update(state[k].detach().float().cpu().numpy().tobytes())
        return {"metrics": metrics, "test": test, "weights_sha": h.hexdigest()}


if __name__ == "__main__":
    out = {name: snapshot(name) for name in (sys.argv[2:] or RUNS)}
    Path(sys.argv[1]).write_text(json.dumps(out, indent=1, sort_keys=True))
