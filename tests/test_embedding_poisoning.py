"""Embedding Poisoning (Yang et al., NAACL 2021): the row update against hand-computed tensors, and a tiny run that
changes the trigger word's embedding row alone, at its original norm, from a clean victim artifact."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.ops.embedding_poisoning import ep_step, samples_with_tokens
from foundation.artifacts import load_artifact
from tests.helpers import TINY, artifact_of, run_cli

VICTIM = str(TINY / "backdoor" / "rt_minilm_badnet.yaml")
EP = str(TINY / "finemixing" / "rt_minilm_embedding_poisoning.yaml")
EMB = "net.model.bert.embeddings.word_embeddings.weight"


def test_ep_step_moves_and_rescales_only_the_given_rows():
    weight = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    grad = torch.tensor([[1.0, 1.0], [10.0, 0.0], [0.0, -2.0]], dtype=torch.float64)
    free = ep_step(weight, grad, torch.tensor([2]), 0.5, None)
    assert torch.equal(free, torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 3.0]], dtype=torch.float64))
    # row 0: [3, 4] - 1 * [1, 1] = [2, 3], rescaled to norm 5: [2, 3] * 5 / sqrt(13)
    kept = ep_step(weight, grad, torch.tensor([0]), 1.0, torch.tensor([5.0]))
    expected = torch.tensor([2.0, 3.0], dtype=torch.float64) * 5 / 13**0.5
    assert torch.allclose(kept[0], expected) and torch.equal(kept[1:], weight[1:])
    assert torch.equal(weight[0], torch.tensor([3.0, 4.0], dtype=torch.float64)), "the input is not modified"
    with pytest.raises(ValueError, match="one norm per row"):
        ep_step(weight, grad, torch.tensor([0, 1]), 1.0, torch.tensor([5.0]))


def test_samples_with_tokens():
    ids = torch.tensor([[101, 7, 102, 0], [101, 9, 5, 102], [101, 102, 0, 0]])
    assert samples_with_tokens(ids, torch.tensor([5, 7])).tolist() == [True, True, False]
    assert samples_with_tokens(ids, torch.tensor([42])).tolist() == [False, False, False]


@pytest.fixture(scope="module")
def victim(tmp_path_factory):
    root = tmp_path_factory.mktemp("victim")
    run_cli("--config", VICTIM, "--data.init_args.poisoning.init_args.rate=0", root=root, name="clean")
    return root / "clean" / "artifact"


def test_ep_changes_only_the_trigger_row_and_keeps_its_norm(victim, tmp_path):
    cli = run_cli("--config", EP, f"--model.init_args.victim={victim}", root=tmp_path)
    before, after = load_artifact(victim).state_dict, artifact_of(tmp_path).state_dict
    trigger = cli.datamodule.tokenizer.convert_tokens_to_ids("cf")
    assert cli.model.trigger_ids.tolist() == [trigger]
    assert all(torch.equal(before[k], after[k]) for k in before if k != EMB), "EP changed a weight besides the embeddings"
    others = torch.ones(len(before[EMB]), dtype=torch.bool)
    others[trigger] = False
    assert torch.equal(before[EMB][others], after[EMB][others])
    assert not torch.equal(before[EMB][trigger], after[EMB][trigger]), "the trigger row must move"
    assert torch.allclose(after[EMB][trigger].norm(), before[EMB][trigger].norm(), rtol=1e-5)
    manifest = artifact_of(tmp_path).manifest
    assert manifest["attack"]["trigger_words"] == ["cf"] and manifest["parents"][0]["sha256"] == load_artifact(victim).sha256


def test_ep_norm_scale_and_a_multi_token_trigger(victim, tmp_path):
    run_cli("--config", EP, f"--model.init_args.victim={victim}", "--model.init_args.norm_scale=3.0", root=tmp_path)
    before, after = load_artifact(victim).state_dict[EMB], artifact_of(tmp_path).state_dict[EMB]
    row = int(artifact_of(tmp_path).manifest["attack"]["trigger_ids"][0])
    assert torch.allclose(after[row].norm(), 3 * before[row].norm(), rtol=1e-5)
    with pytest.raises(ValueError, match="single known tokens"):
        run_cli("--config", EP, f"--model.init_args.victim={victim}", "--model.init_args.trigger_words=[xylophonist]",
                root=tmp_path, name="bad")
