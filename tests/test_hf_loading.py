"""Hugging Face weights are read from safetensors only (``lightning_modules.nets.hf.load_hf_model``)."""

import pytest
import torch
from transformers import AutoModel, BertConfig, BertModel

from lightning_modules.nets.hf import load_hf_model
from lightning_modules.w2sdefense import ProjectedTeacher

CONFIG = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=50)


@pytest.fixture
def checkpoints(tmp_path):
    """The same tiny BERT saved twice: as safetensors, and only as a pickled ``pytorch_model.bin``."""
    torch.manual_seed(0)
    model = BertModel(BertConfig(**CONFIG))
    safe, pickled = tmp_path / "safe", tmp_path / "pickled"
    model.save_pretrained(safe)
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    return model, safe, pickled


def test_safetensors_weights_load_unchanged(checkpoints):
    model, safe, _ = checkpoints
    loaded = load_hf_model(AutoModel, str(safe), BertConfig.from_pretrained(safe))
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_pickled_checkpoint_is_refused_with_the_conversion(checkpoints):
    _, _, pickled = checkpoints
    with pytest.raises(ValueError, match="no safetensors weights.*safe_serialization=True"):
        load_hf_model(AutoModel, str(pickled), BertConfig.from_pretrained(pickled))
    with pytest.raises(ValueError, match="no safetensors weights"):
        ProjectedTeacher(str(pickled), student_hidden_size=8).build()


def test_random_init_ignores_the_weights_and_keeps_the_dtype(checkpoints):
    model, _, pickled = checkpoints
    fresh = load_hf_model(AutoModel, str(pickled), BertConfig.from_pretrained(pickled), True, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in fresh.parameters())
    key = "embeddings.word_embeddings.weight"
    assert not torch.equal(fresh.state_dict()[key].float(), model.state_dict()[key])
