"""configs/trainer/fsdp.yaml wraps each transformer block in its own FSDP unit (2 gloo processes on CPU).

Lightning's ``Trainer`` refuses FSDP without a GPU, and ``FSDPStrategy._setup_model`` passes ``device_id=None`` on
CPU, which torch's FSDP refuses. So the test builds the strategy of the config itself (jsonargparse, as
``python -m recipes`` does) and repeats what ``_setup_model`` does with it -- ``FullyShardedDataParallel(module,
sharding_strategy=..., **strategy.kwargs)`` (``kwargs`` holds the auto-wrap policy), then Lightning's
``_setup_activation_checkpointing`` with the strategy's checkpointing kwargs -- with ``device_id=cpu``, on a process
group of two CPU ranks (gloo).
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from lightning_modules.nets.fsdp import TransformerBlockPolicy
from tests.helpers import CONFIGS


def _tiny_models():
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))  # fmt: skip
    bert = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=2, num_attention_heads=4, num_labels=2))  # fmt: skip
    return {"LlamaDecoderLayer": (llama.eval(), 3), "BertLayer": (bert.eval(), 2)}  # eval: no dropout, comparable


def _strategy(checkpointing: bool):
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy

    spec = yaml.safe_load((CONFIGS / "trainer" / "fsdp.yaml").read_text())["trainer"]["strategy"]
    if checkpointing:  # the flag the config's header gives
        spec["init_args"]["activation_checkpointing_policy"] = "lightning_modules.nets.fsdp.TransformerBlockPolicy"
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--strategy", type=FSDPStrategy)
    strategy = parser.instantiate_classes(parser.parse_object({"strategy": spec})).strategy
    return strategy


def _worker(rank: int, port: int) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        cases = [(ac, block, spec) for ac in (False, True) for block, spec in _tiny_models().items()]  # fresh models
        for checkpointing, block, (model, layers) in cases:
            ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
            reference = model(input_ids=ids).logits.detach()
            strategy = _strategy(checkpointing)
            wrapped = FSDP(module=model, sharding_strategy=strategy.sharding_strategy, device_id=torch.device("cpu"),
                           **strategy.kwargs)  # fmt: skip
            _setup_activation_checkpointing(wrapped, strategy._activation_checkpointing_kwargs)
            units = [m for m in wrapped.modules() if isinstance(m, FSDP)]
            inner = [type(u.module).__name__ for u in units[1:]]
            assert len(units) == 1 + layers, f"{block}: {len(units)} FSDP units"
            assert inner == [block] * layers, inner
            blocks = [m for m in wrapped.modules() if type(m).__name__ == block]
            assert len(blocks) == layers
            n_ckpt = sum(isinstance(m, CheckpointWrapper) for m in wrapped.modules())
            assert n_ckpt == (layers if checkpointing else 0), n_ckpt
            out = wrapped(input_ids=ids).logits
            torch.testing.assert_close(out.detach(), reference, rtol=1e-5, atol=1e-5)
            out.float().pow(2).mean().backward()  # gathers and reshards each block, recomputing if checkpointed
            shards = [p for p in wrapped.parameters() if p.grad is not None]
            assert shards and all(torch.isfinite(p.grad).all() for p in shards)
        dist.barrier()  # no rank closes its connections while the other still uses them
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp_config_wraps_each_transformer_block_with_and_without_activation_checkpointing():
    mp.spawn(_worker, args=(_free_port(),), nprocs=2, join=True)


def test_policy_finds_the_blocks_and_leaves_tied_embeddings_in_the_root():
    models = _tiny_models()
    for block, (model, _) in models.items():
        policy = TransformerBlockPolicy()
        assert policy(model, recurse=True) and policy.block_names == {block}
        embeddings = model.get_input_embeddings()
        assert not policy(embeddings, recurse=False), "embeddings (tied to the LM head in Llama) stay in the root unit"
    assert TransformerBlockPolicy(block_names=["MyBlock"]).block_names == {"MyBlock"}
