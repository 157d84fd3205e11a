"""TAR matched to the official code (issue 28): the floor control (the trained span re-initialised), a retain corpus
unrelated to the forget facts, training adversaries drawn as the official code draws them and shared by every rank
(2 gloo processes), the TR entropy over every token, layer means over every hidden state, schedule-free AdamW, and
the cluster recipe (fp32 weights with bf16 compute, flat FSDP parameters, an 8B-sized harness)."""

from __future__ import annotations

import os
import socket
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from callbacks.tamper import load_attacks
from datamodules.tar_facts import TamperFactsDataModule
from lightning_modules.nets.split_lm import SplitCausalLM
from lightning_modules.tamper import AdversarySpace, TamperAttack, draw_adversary, token_logits
from lightning_modules.tar import TAR, RandomReinit
from tests.helpers import CONFIGS, REPO, run_cli
from tests.test_tar import TINY_LLAMA, ProbedTAR, fit, tiny_net

SPACE = AdversarySpace(learning_rates={"adamw": [1e-3, 1e-2], "sgd": [1e-1]},
                       data={"forget": 1.0, "retain_then_forget": 1.0}, steps=4, batch_size=4)  # fmt: skip


@pytest.fixture(scope="module")
def dm():
    data = TamperFactsDataModule(forget_train_size=8, forget_meta_size=4, attack_size=6, forget_eval_size=8,
                                 retain_eval_size=8, batch_size=4, eval_batch_size=4, retain_corpus="rotten-tomatoes",
                                 retain_corpus_size=16, retain_max_length=24)  # fmt: skip
    data.setup()
    return data


def _config(name: str) -> dict:
    return yaml.safe_load((CONFIGS / "tar" / name).read_text())


# ------------------------------------------------------------------------------------------- 1. depth and floor
def test_floor_reinitialises_the_trained_span_only_and_keeps_the_trunk_and_its_cache():
    pretrained = tiny_net(trainable_layers=2)
    floor = RandomReinit(tiny_net(trainable_layers=2), reinit_seed=3)
    floor.configure_model()
    before, after = dict(pretrained.named_parameters()), dict(floor.net.named_parameters())
    trained = {n for n, p in after.items() if p.requires_grad}
    assert trained and all(n.startswith(("lm.model.layers.2.", "lm.model.layers.3.", "lm.model.norm")) for n in trained)
    for name, p in after.items():
        changed = not torch.equal(p, before[name])
        assert changed == (name in trained and "norm" not in name and "layernorm" not in name), name
        if "norm" in name and name in trained:
            assert torch.equal(p, torch.ones_like(p)), name  # norms start at 1 (Hugging Face's _init_weights)
    weights = torch.cat([p.flatten() for n, p in after.items() if n in trained and "proj" in n])
    assert weights.std().item() == pytest.approx(floor.net.lm.config.initializer_range, rel=0.1)
    again = RandomReinit(tiny_net(trainable_layers=2), reinit_seed=3)
    again.configure_model()
    assert all(torch.equal(p, q) for p, q in zip(floor.net.parameters(), again.net.parameters()))  # seeded


def test_a_fully_trained_model_lists_every_hidden_state_as_hugging_face_does(dm):
    net = tiny_net(trainable_layers=None, cache=False)
    ids, mask, _ = dm.sample("forget_train", 4, torch.Generator().manual_seed(0))
    _, hidden = net(ids, mask)
    out = net.lm(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
    assert len(hidden) == net.num_hidden_states == len(out.hidden_states) == TINY_LLAMA["num_hidden_layers"] + 1
    for ours, theirs in zip(hidden[:-1], out.hidden_states[:-1]):  # HF's last entry is after the final norm
        torch.testing.assert_close(ours[mask], theirs[mask], rtol=1e-4, atol=1e-4)


def test_shipped_configs_train_and_attack_twelve_blocks_and_the_floor_matches_the_span():
    for name in ("smollm2_none", "smollm2_floor", "smollm2_gradient_ascent", "smollm2_random_mapping", "smollm2_tar"):
        net = _config(f"{name}.yaml")["model"]["init_args"]["model"]["init_args"]
        assert net["trainable_layers"] == 12, name
    assert _config("smollm2_floor.yaml")["model"]["class_path"] == "RandomReinit"


# ------------------------------------------------------------------------------------------- 2. retain corpus
def test_unrelated_retain_corpus_trains_no_fact_and_keeps_the_facts_as_evaluation(dm):
    assert dm.facts["retain_train"] == [] and len(dm.facts["retain_eval"]) == 8
    ids, mask, ans = dm.sets["retain_train"].tensors
    assert len(ids) == 16 and bool((ans == mask).all())  # free text: every token counts
    from datamodules.text import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    texts = [tok.decode(row[m]) for row, m in zip(ids, mask)]
    subjects = {f.subject for split in ("forget_train", "forget_meta", "attack", "forget_eval", "retain_eval")
                for f in dm.facts[split]}  # fmt: skip
    targets = {f.target for split in ("forget_eval", "retain_eval") for f in dm.facts[split]}
    assert not any(s in t for t in texts for s in subjects | targets), "a retain snippet names an evaluated fact"
    assert dm.describe()["retain_corpus"] == "rotten-tomatoes"
    for name in ("smollm2_none", "smollm2_floor", "smollm2_gradient_ascent", "smollm2_random_mapping", "smollm2_tar"):
        assert _config(f"{name}.yaml")["data"]["init_args"]["retain_corpus"] == "rotten-tomatoes", name
    with pytest.raises(ValueError, match="retain_corpus_size"):
        TamperFactsDataModule(retain_corpus="rotten-tomatoes", retain_corpus_size=0)


# ------------------------------------------------------------------------------------------- 3. adversaries
def test_adversary_space_draws_data_type_and_learning_rate_independently_as_official():
    gen = torch.Generator().manual_seed(0)
    draws = [draw_adversary(SPACE, gen) for _ in range(600)]
    pairs = Counter((a.optimizer, a.lr) for a, _ in draws)
    assert set(pairs) == {("adamw", 1e-3), ("adamw", 1e-2), ("sgd", 1e-1)}
    assert all(150 < n < 250 for n in pairs.values())  # uniform over the (optimizer, lr) pairs
    kinds = Counter(a.data for a, _ in draws)
    assert 240 < kinds["forget"] < 360
    switches = [r for a, r in draws if a.data == "retain_then_forget"]
    assert all(r == 0 for a, r in draws if a.data == "forget") and 0 < sum(switches) / len(switches) < 4
    joint = Counter((a.data, a.lr) for a, _ in draws)
    assert len(joint) == 6  # every data type meets every learning rate
    assert all(a.steps == 4 and a.completion_only is False and a.lora_rank == 0 for a, _ in draws)
    with pytest.raises(ValueError, match="unknown"):
        AdversarySpace(learning_rates={"rmsprop": [1e-3]})
    with pytest.raises(ValueError, match="exactly one"):
        TAR(tiny_net(), [TamperAttack(steps=4)], adversary_space=SPACE)
    with pytest.raises(ValueError, match="tr_every"):
        TAR(tiny_net(), adversary_space=SPACE, tr_every=8)


def test_shipped_training_adversaries_span_the_harness_with_k_at_least_24():
    space = AdversarySpace(**_config("smollm2_tar.yaml")["model"]["init_args"]["adversary_space"])
    assert space.steps >= 24 and space.completion_only is False and set(space.data) == {"forget", "retain_then_forget"}
    harness = load_attacks(CONFIGS / "tar" / "attacks" / "harness.yaml")
    full = {(a.optimizer, a.lr) for a in harness if not a.lora_rank}
    assert full <= set(space.pairs()), full - set(space.pairs())
    official = AdversarySpace(**_config("llama3_8b_tar_fsdp.yaml")["model"]["init_args"]["adversary_space"])
    assert official.pairs() == [("adamw", 2e-6), ("adamw", 2e-5), ("adamw", 4e-5)] and official.steps == 64


def test_the_adversary_generator_does_not_depend_on_the_rank():
    model = TAR(tiny_net(), adversary_space=SPACE, tr_every=2)
    runs = []
    for rank in (0, 1):
        model.seed_generators(5, rank)
        runs.append(([model.draw_adversary() for _ in range(6)], torch.randint(10**6, (3,), generator=model._gen)))
    assert runs[0][0] == runs[1][0]  # the same adversaries
    assert not torch.equal(runs[0][1], runs[1][1])  # but each rank reads its own batches


def test_a_resumed_run_continues_the_draws_of_the_interrupted_one(tmp_path):
    model = TAR(tiny_net(), adversary_space=SPACE, tr_every=2)
    model.seed_generators(5, 0)
    [model.draw_adversary() for _ in range(3)]
    torch.randint(10**6, (3,), generator=model._gen)
    checkpoint: dict = {}
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "c.ckpt")
    expected = [model.draw_adversary() for _ in range(6)], torch.randint(10**6, (3,), generator=model._gen)
    runs = []
    for rank in (0, 1):
        resumed = TAR(tiny_net(), adversary_space=SPACE, tr_every=2)
        resumed.on_load_checkpoint(torch.load(tmp_path / "c.ckpt", weights_only=True))
        resumed.seed_generators(5, rank)  # what on_fit_start does before it restores
        resumed.restore_generators(resumed._restored_generators, rank)
        runs.append(([resumed.draw_adversary() for _ in range(6)], torch.randint(10**6, (3,), generator=resumed._gen)))
    fresh = TAR(tiny_net(), adversary_space=SPACE, tr_every=2)
    fresh.seed_generators(5, 0)
    assert runs[0][0] == expected[0] and torch.equal(runs[0][1], expected[1])  # rank 0: exactly the same draws
    assert runs[1][0] == expected[0] and not torch.equal(runs[1][1], expected[1])  # rank 1: same adversaries only
    assert [fresh.draw_adversary() for _ in range(6)] != expected[0]  # not a restart from the seed


def test_the_tiny_twin_interrupted_and_resumed_draws_what_an_uninterrupted_run_draws(tmp_path):
    twin = str(REPO / "tests" / "configs" / "tar" / "smollm2_tar.yaml")
    straight = run_cli("--config", twin, root=tmp_path, name="straight")  # 2 RM steps, then outer steps 3 and 4
    run_cli("--config", twin, "--trainer.max_steps=3", root=tmp_path, name="interrupted")
    last = tmp_path / "interrupted" / "checkpoints" / "last.ckpt"
    resumed = run_cli("--config", twin, f"--ckpt_path={last}", root=tmp_path, name="interrupted")
    assert resumed.trainer.global_step == straight.trainer.global_step == 4
    assert torch.equal(resumed.model._adversary_gen.get_state(), straight.model._adversary_gen.get_state())
    assert torch.equal(resumed.model._gen.get_state(), straight.model._gen.get_state())
    # the retain batches continue the interrupted shuffle too (datamodules.base.ResumableDataLoader), so the resumed
    # run ends at the uninterrupted run's weights up to float rounding (4e-9 at most when this was written; 1.5e-3
    # with a plain DataLoader, whose resumed pass is a fresh shuffle)
    for (name, a), b in zip(resumed.model.named_parameters(), straight.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def _shared_draw_worker(rank: int, port: int) -> None:
    from types import SimpleNamespace

    from lightning.pytorch.strategies.strategy import _ForwardRedirection
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from lightning_modules.nets.fsdp import TransformerBlockPolicy

    # the launcher variables exist only in this child process (tests/conftest.py forbids leaking them)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(1000 + rank)  # the ranks' global generators differ (no seed_everything)
        model = TAR(SplitCausalLM(random_init=True, config_overrides=TINY_LLAMA, trainable_layers=None,
                                  cache_trunk=False, bos_token="<|endoftext|>"),
                    adversary_space=SPACE, tr_every=2, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))  # fmt: skip
        model.seed_generators(torch.initial_seed(), rank)  # even the adversary seed differs: rank 0's draw wins
        draws = [model.draw_adversary() for _ in range(8)]
        batch = torch.randint(10**6, (4,), generator=model._gen).tolist()
        gathered: list = [None, None]
        dist.all_gather_object(gathered, (draws, batch))
        assert gathered[0][0] == gathered[1][0], "the ranks drew different adversaries"
        assert gathered[0][1] != gathered[1][1], "the ranks read the same batches"
        assert len({(a.optimizer, a.lr, a.data) for a, _ in draws}) > 1  # one adversary per outer step, not one
        # FSDP1 with flat parameters (official use_orig_params=False): the optimizer holds the flat parameters
        model.configure_model()
        wrapped = FSDP(model, use_orig_params=False, device_id=torch.device("cpu"),
                       auto_wrap_policy=TransformerBlockPolicy())  # fmt: skip
        model._trainer = SimpleNamespace(model=wrapped)
        params = model.trained_parameters()
        units = [m for m in wrapped.modules() if isinstance(m, FSDP)]
        assert len(params) == len(units) == 1 + TINY_LLAMA["num_hidden_layers"]
        assert all(getattr(p, "_fsdp_flattened", False) for p in params)
        optimizer = model.configure_optimizers()
        assert [p for g in optimizer.param_groups for p in g["params"]] == params
        # several backward passes in one training step (Lightning runs training_step inside the root's forward):
        # each loss a forward of the wrapper (TAR.through_wrapper), as the official model(**inputs) calls
        own = torch.randint(5, 900, (2, 6), generator=torch.Generator().manual_seed(rank))  # each rank's data
        common = torch.randint(5, 900, (2, 6), generator=torch.Generator().manual_seed(7))
        batch = [own, torch.ones_like(own, dtype=torch.bool)] * 2
        snapshot = [p.detach().clone() for p in params]

        def inner_loop(direct: bool = False) -> torch.Tensor:
            call = (lambda m, *a: getattr(model, m)(*a)) if direct else model.through_wrapper
            for _ in range(2):
                loss = call("adversary_loss", batch[:3], False)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                call("tr_loss", batch[:3]).backward()
            return torch.zeros(())

        model.inner_loop = inner_loop
        _ForwardRedirection()(wrapped, model, "inner_loop")
        assert any(not torch.equal(p, q) for p, q in zip(params, snapshot)), "the adversary moved nothing"
        with torch.no_grad():
            probe = model.through_wrapper("adversary_loss", [common, torch.ones_like(common, dtype=torch.bool)] * 2,
                                          False)  # fmt: skip
        probes: list = [None, None]
        dist.all_gather_object(probes, probe.item())
        assert probes[0] == pytest.approx(probes[1], rel=1e-6), "the ranks' weights drifted apart"
        with torch.no_grad():  # the snapshot restores the flat shards exactly
            for p, q in zip(params, snapshot):
                p.copy_(q)
        assert all(torch.equal(p, q) for p, q in zip(params, snapshot))
        with pytest.raises(AssertionError, match="BACKWARD_PRE"):  # why: direct calls break FSDP1's root unit
            _ForwardRedirection()(wrapped, model, "inner_loop", True)
        model._trainer = None
        dist.barrier()  # no rank closes its connections while the other still uses them
    finally:
        dist.destroy_process_group()


def test_every_rank_draws_the_same_adversary_and_fsdp_trains_flat_parameters_across_backward_passes():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_shared_draw_worker, args=(port,), nprocs=2, join=True)


def test_tr_entropy_counts_every_token_or_the_answers(dm):
    net = tiny_net()
    batch = dm.sample("forget_meta", 4, torch.Generator().manual_seed(0))
    _, mask, ans = batch
    assert token_logits(net, batch, "all").shape[0] == int(mask.sum())
    assert token_logits(net, batch, "answer").shape[0] == int(ans[:, 1:].sum()) < int(mask.sum())
    assert _config("smollm2_tar.yaml")["model"]["init_args"]["tr_tokens"] == "all"


def test_schedule_free_outer_steps_restore_the_snapshot_exactly(dm):
    import schedulefree

    model = ProbedTAR(tiny_net(), adversary_space=SPACE, tr_every=2, meta_batch_size=4,
                      optimizer=lambda p: schedulefree.AdamWScheduleFree(p, lr=1e-3, warmup_steps=2))  # fmt: skip
    fit(model, dm, steps=3)
    assert len(model.records) == 3 and all(r["inner_moved"] and r["restored"] for r in model.records)
    opt = model.trainer.optimizers[0]
    assert isinstance(opt, schedulefree.AdamWScheduleFree) and opt.param_groups[0]["train_mode"]
    assert opt.param_groups[0]["k"] == 3  # three outer steps, none skipped
    for name in ("smollm2_tar.yaml", "llama3_8b_tar_fsdp.yaml"):
        spec = _config(name)["model"]["init_args"]["optimizer"]
        assert spec == {"class_path": "schedulefree.AdamWScheduleFree",
                        "init_args": {"lr": 2e-5, "warmup_steps": 32}}, name  # fmt: skip  (run_tar_bio.sh)
    rm = _config("smollm2_random_mapping.yaml")
    assert rm["model"]["init_args"]["optimizer"]["init_args"] == {"lr": 2e-5, "warmup_steps": 50}  # tar.py default
    assert rm["trainer"]["max_steps"] == 750 and rm["data"]["init_args"]["batch_size"] == 16  # 750 x (2 x ga 8)


# ------------------------------------------------------------------------------------------- 4. cluster recipe
def test_cluster_recipe_keeps_fp32_weights_with_bf16_compute_flat_fsdp_parameters_and_an_8b_harness():
    config = _config("llama3_8b_tar_fsdp.yaml")
    trainer, model = config["trainer"], config["model"]["init_args"]
    assert trainer["precision"] == "bf16-mixed" and model["model"]["init_args"]["dtype"] == "float32"
    strategy = trainer["strategy"]
    assert strategy["class_path"].endswith("FlatParamFSDPStrategy")
    assert strategy["init_args"]["use_orig_params"] is False
    assert strategy["init_args"]["sharding_strategy"] == "FULL_SHARD"  # official fsdp_sharding_strategy: 1
    from lightning_modules.nets.fsdp import FlatParamFSDPStrategy

    assert FlatParamFSDPStrategy(sharding_strategy="FULL_SHARD").kwargs["use_orig_params"] is False
    harness = trainer["callbacks"][1]["init_args"]["attacks_file"]
    attacks = load_attacks(harness)
    assert harness.endswith("harness_llama3_8b.yaml")
    assert all(a.steps == 1000 and a.batch_size == 16 and not a.completion_only for a in attacks)
    assert {a.optimizer for a in attacks} == {"adamw", "adam", "sgd"} and any(a.lora_rank == 16 for a in attacks)
    assert any(a.data == "retain_then_forget" and a.retain_fraction == 0.4 for a in attacks)
