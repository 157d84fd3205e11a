"""FedSelect and the PFL baselines on digits: masks only grow and stop at the cap, personal entries are never
overwritten by the server once personal, each entry is averaged over the clients that share it only, LocalAlt
equals the official masked-gradient SGD, the baselines' masks, personalized evaluation, resume, config errors,
and the 2-classes-per-client partition."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.nn.utils import parameters_to_vector

from datamodules.federated import FederatedDataModule
from lightning_modules import Ditto, FedPer, FedSelect, LGFedAvg, LocalTrainer, PersonalizedFedAvg
from lightning_modules.federated import ClientContext, Median
from lightning_modules.nets.cnn import MnistCNN
from datamodules.partition import class_partition

SGD = dict(lr=0.05, momentum=0.0, weight_decay=0.0, batch_size=32)


def make_dm(**kw) -> FederatedDataModule:
    args = dict(dataset="digits", num_clients=6, partition="classes", client_test_fraction=0.25, rounds_per_epoch=2,
                eval_batch_size=300)  # fmt: skip
    return FederatedDataModule(**{**args, **kw})


def make(cls=FedSelect, **kw):
    torch.manual_seed(0)
    args = dict(net=MnistCNN(image_size=8, width=4, hidden=16), clients_per_round=6, seed=0, local=LocalTrainer(**SGD))
    if cls is FedSelect:
        args.update(period=1, growth_rate=0.5, cap=0.8)
    return cls(**{**args, **kw})


def fit(recipe, dm, rounds: int, callbacks=(), **trainer_kw) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", max_steps=rounds, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=list(callbacks),
                        **{"enable_checkpointing": False, "limit_val_batches": 0, **trainer_kw})  # fmt: skip
    trainer.fit(recipe, dm)
    return trainer


class Snapshots(Callback):
    """Client tensors after every round."""

    def __init__(self):
        self.rounds: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.rounds.append({k: v.clone() for k, v in pl_module.clients.items()})


def tensor_slices(net):
    offset = 0
    for name, p in net.named_parameters():
        yield name, slice(offset, offset + p.numel())
        offset += p.numel()


def test_masks_only_grow_never_past_the_cap_and_biases_stay_shared():
    recipe, snaps = make(), Snapshots()
    fit(recipe, make_dm(), 6, [snaps])
    masks = [s["personal"] for s in snaps.rounds]
    assert not masks[0].any(), "no growth in round 0"
    for before, after in zip(masks, masks[1:]):
        assert (after | before).equal(after), "a personal entry became shared"
    assert masks[1].sum() > 0 and masks[2].sum() > masks[1].sum(), "the mask did not grow"
    for name, sl in tensor_slices(recipe.net):
        fraction = masks[-1][:, sl].float().mean(1)
        if "weight" in name:
            assert (fraction <= 0.8).all() and (fraction >= 0.7).all(), (name, fraction)  # 50% growth, cap 80%
        else:
            assert not masks[-1][:, sl].any(), f"{name} must stay shared"


def test_personal_entries_are_never_overwritten_by_the_server(monkeypatch):
    recipe, snaps = make(), Snapshots()
    starts: dict[tuple[int, int], torch.Tensor] = {}
    original = FedSelect.client_update

    def spy(self, round, client, dm):
        starts[(round, client)] = self.client_start(client).clone()
        return original(self, round, client, dm)

    monkeypatch.setattr(FedSelect, "client_update", spy)
    fit(recipe, make_dm(), 5, [snaps])
    checked = 0
    for r in range(1, 5):
        prev = snaps.rounds[r - 1]  # after round r-1: the client's own model and its (grown) mask
        for c in range(6):
            personal = prev["personal"][c]
            assert torch.equal(starts[(r, c)][personal], prev["params"][c][personal])
            checked += int(personal.sum())
    assert checked > 0
    # and the evaluated (broadcast) model keeps them too
    model = recipe.personalized_model(0, recipe.trainer.datamodule)
    mask = recipe.clients["personal"][0]
    assert torch.equal(parameters_to_vector(model.parameters())[mask], recipe.clients["params"][0][mask])


def test_each_entry_is_averaged_over_the_clients_that_share_it_only():
    dm = make_dm()
    dm.setup()
    recipe = make(period=10)  # no growth in this round
    d = sum(p.numel() for p in recipe.net.parameters())
    g = parameters_to_vector(recipe.net.parameters()).detach()
    personal = torch.rand(6, d, generator=torch.Generator().manual_seed(1)) < 0.5
    personal[:, :10] = True  # entries 0-9: nobody shares them
    recipe.clients = {"params": g.repeat(6, 1), "personal": personal, "buffers": g.new_zeros(6, 0),
                      "reference": g.repeat(6, 1)}  # fmt: skip
    out = recipe.compute_round(1, dm)
    clients, updates = out["clients"], out["updates"]
    weights = torch.tensor([float(dm.num_samples(c)) for c in clients])
    shared = ~personal[clients]
    for j in [0, 5, 10, 100, 500, d - 1]:
        rows = shared[:, j]
        expected = (weights[rows] * updates[rows, j]).sum() / weights[rows].sum() if rows.any() else torch.tensor(0.0)
        torch.testing.assert_close(out["aggregate"][j], expected)
    assert (out["aggregate"][:10] == 0).all()


def test_local_alt_equals_masked_gradient_sgd():
    """LocalAlt's restore-after-step equals the official MaskLocalAltSGD (``p -= lr * mask * grad``), with a
    personal pass before the shared pass."""
    dm = make_dm()
    dm.setup()
    recipe = make()
    d = sum(p.numel() for p in recipe.net.parameters())
    personal = torch.rand(d, generator=torch.Generator().manual_seed(3)) < 0.3
    recipe.clients = {"personal": personal[None]}
    x, y = dm.client_data(0)
    model = copy.deepcopy(recipe.net)
    ctx = ClientContext(0, 0, [], torch.empty(0), None, dm, recipe.local, torch.Generator().manual_seed(7))
    reference = copy.deepcopy(recipe.net)
    recipe.local_update(model, x, y, ctx)

    gen = torch.Generator().manual_seed(7)
    for active in (personal, ~personal):
        perm = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), 32):
            idx = perm[start : start + 32]
            reference.zero_grad()
            F.cross_entropy(reference(x[idx]), y[idx]).backward()
            with torch.no_grad():
                offset = 0
                for p in reference.parameters():
                    m = active[offset : offset + p.numel()].view_as(p)
                    p -= 0.05 * m * p.grad
                    offset += p.numel()
    torch.testing.assert_close(parameters_to_vector(model.parameters()), parameters_to_vector(reference.parameters()))


@pytest.mark.parametrize(
    "cls, kw, personal_names",
    [
        (PersonalizedFedAvg, {}, []),
        (FedPer, {}, ["head.weight", "head.bias"]),
        (LGFedAvg, {}, ["body.0.weight", "body.0.bias", "body.3.weight", "body.3.bias", "body.7.weight", "body.7.bias"]),
        (FedPer, {"personal_layers": ["body.7", "head.bias"]}, ["body.7.weight", "body.7.bias", "head.bias"]),
    ],
)
def test_baseline_masks_and_shared_entries_follow_the_server(cls, kw, personal_names):
    recipe, snaps = make(cls, **kw), Snapshots()
    fit(recipe, make_dm(), 2, [snaps])
    mask = recipe.clients["personal"]
    g = parameters_to_vector(recipe.net.parameters()).detach()
    for name, sl in tensor_slices(recipe.net):
        assert bool(mask[:, sl].all()) == (name in personal_names) and bool(mask[:, sl].any()) == (name in personal_names)
    model = recipe.personalized_model(2, recipe.trainer.datamodule)
    flat = parameters_to_vector(model.parameters()).detach()
    torch.testing.assert_close(flat[~mask[2]], g[~mask[2]])  # shared entries: the server's
    assert torch.equal(snaps.rounds[0]["personal"], mask), "fixed masks must not change"


def test_ditto_personal_model_is_pulled_to_the_global_one_and_the_global_model_is_fedavg():
    dm = make_dm()
    fedavg, ditto_free, ditto_tied = make(PersonalizedFedAvg), make(Ditto, prox_lambda=0.0), make(Ditto, prox_lambda=10.0)
    for recipe in (fedavg, ditto_free, ditto_tied):
        fit(recipe, dm, 2)
    g = parameters_to_vector(fedavg.net.parameters())
    torch.testing.assert_close(parameters_to_vector(ditto_free.net.parameters()), g)  # same global training
    dist = [float((r.clients["params"] - g).norm(dim=1).mean()) for r in (ditto_free, ditto_tied)]
    assert dist[1] < 0.5 * dist[0], dist
    assert ditto_tied.clients["personal"].all()


def test_personalized_evaluation_logs_mean_spread_and_each_client(tmp_path):
    recipe = make(PersonalizedFedAvg, finetune_epochs=1)
    trainer = fit(recipe, make_dm(), 2, limit_val_batches=None)
    assert {"val/pacc", "val/pacc_std", "val/pacc_min", "val/acc"} <= set(trainer.callback_metrics)
    m = trainer.test(recipe, make_dm(), verbose=False)[0]
    per_client = torch.tensor([m[f"test/pacc_client{c}"] for c in range(6)])
    assert abs(per_client.mean() - m["test/pacc"]) < 1e-6 and abs(per_client.min() - m["test/pacc_min"]) < 1e-6
    assert abs(per_client.std(unbiased=False) - m["test/pacc_std"]) < 1e-6
    plain = make(PersonalizedFedAvg)
    fit(plain, make_dm(), 2)
    accs = plain.client_accuracies(plain.trainer.datamodule)
    dm = plain.trainer.datamodule
    for c in (0, 3):  # FedAvg: every client is scored with the global model on its own test split
        x, y = dm.client_test(c)
        assert abs(float((plain.net(x).argmax(-1) == y).float().mean()) - float(accs[c])) < 1e-6
    assert not torch.allclose(recipe.client_accuracies(dm), accs), "fine-tuning before evaluation had no effect"


@pytest.mark.filterwarnings("ignore:Checkpoint directory")
def test_resume_restores_masks_client_models_and_references(tmp_path):
    def run(rounds, root, ckpt_path=None):
        recipe = make()
        trainer = L.Trainer(accelerator="cpu", max_steps=rounds, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                            callbacks=[ModelCheckpoint(dirpath=root, save_last=True)], default_root_dir=root)  # fmt: skip
        trainer.fit(recipe, make_dm(), ckpt_path=ckpt_path)
        return recipe

    straight = run(4, tmp_path / "straight")
    run(2, tmp_path / "part")
    resumed = run(4, tmp_path / "part", ckpt_path=str(tmp_path / "part" / "last.ckpt"))
    assert set(resumed.clients) == {"params", "personal", "buffers", "reference"}
    for key, value in straight.clients.items():
        assert torch.equal(value, resumed.clients[key]), key
    assert torch.equal(parameters_to_vector(straight.net.parameters()), parameters_to_vector(resumed.net.parameters()))


@pytest.mark.parametrize(
    "recipe_kw, dm_kw, match",
    [
        ({"aggregator": Median()}, {}, "aggregator FedAvg"),
        ({}, {"client_test_fraction": 0.0}, "client_test_fraction"),
        ({"select": "gamma"}, {}, "matches no parameter"),
    ],
)
def test_bad_setup_fails_before_round_one(recipe_kw, dm_kw, match):
    with pytest.raises(ValueError, match=match):
        fit(make(**recipe_kw), make_dm(**dm_kw), 1)


@pytest.mark.parametrize("kw", [{"growth_rate": 0.0}, {"cap": 1.5}, {"period": 0}])
def test_bad_fedselect_knobs(kw):
    with pytest.raises(ValueError, match="FedSelect needs"):
        make(**kw)


def test_fedper_unknown_layer_names_the_parameters():
    with pytest.raises(ValueError, match="no parameter name starts with"):
        fit(make(FedPer, personal_layers=["classifier"]), make_dm(), 1)


@pytest.mark.parametrize("num_clients, k", [(10, 2), (7, 3), (20, 2), (5, 10), (3, 1)])
def test_class_partition_gives_each_client_exactly_k_classes(num_clients, k):
    labels = torch.arange(1000) % 10
    parts = class_partition(labels, num_clients, k, torch.Generator().manual_seed(0))
    union = torch.cat(parts)
    assert union.unique().numel() == union.numel(), "a sample was given to two clients"
    assert all(labels[p].unique().numel() == k for p in parts)
    holders = torch.stack([torch.bincount(labels[p], minlength=10) > 0 for p in parts]).sum(0)
    assert int(holders.max() - holders.min()) <= 1, holders  # classes spread evenly over clients
    if num_clients * k >= 10:
        assert union.numel() == 1000
    again = class_partition(labels, num_clients, k, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(parts, again))


def test_class_partition_errors_and_datamodule():
    labels = torch.arange(100) % 10
    with pytest.raises(ValueError, match="classes_per_client must be in"):
        class_partition(labels, 5, 11)
    with pytest.raises(ValueError, match="use fewer clients"):
        class_partition(torch.arange(20) % 10, 20, 2)
    dm = make_dm(num_clients=10)
    dm.setup()
    for c in range(10):  # the client's own test split has the same two classes as its training data
        assert set(dm.client_data(c)[1].tolist()) == set(dm.client_test(c)[1].tolist()) and len(set(dm.client_data(c)[1].tolist())) == 2


def test_evaluation_after_local_training_and_after_broadcast_are_both_logged_at_test():
    """``test/pacc`` is the configured score; ``pacc_local`` is each client's model right after its local training
    (the official protocol), ``pacc_broadcast`` its personal entries with the server's new shared ones."""
    recipe = make(eval_model="local")
    fit(recipe, make_dm(), 3)
    dm = recipe.trainer.datamodule
    m = recipe.trainer.test(recipe, dm, verbose=False)[0]
    assert abs(m["test/pacc"] - m["test/pacc_local"]) < 1e-6
    for eval_model in ("local", "broadcast"):
        expected = float(recipe.client_accuracies(dm, eval_model).mean())
        assert abs(m[f"test/pacc_{eval_model}"] - expected) < 1e-6, eval_model
    fedavg = make(PersonalizedFedAvg)
    fit(fedavg, make_dm(), 2)
    dm = fedavg.trainer.datamodule
    x, y = dm.client_test(2)
    local = fedavg._model(fedavg.clients["params"][2], fedavg.clients["buffers"][2])  # FedAvg: its last local model
    assert abs(float((local(x).argmax(-1) == y).float().mean()) - float(fedavg.client_accuracies(dm, "local")[2])) < 1e-6
    assert not torch.equal(fedavg.client_accuracies(dm, "local"), fedavg.client_accuracies(dm, "broadcast"))


def test_shift_pixels_by_hand():
    from datamodules.federated import shift_pixels

    x = torch.tensor([[[[0.0, 0.1], [0.2, 0.3]]]])
    assert torch.equal(shift_pixels(x, "rot90"), torch.tensor([[[[0.1, 0.3], [0.0, 0.2]]]]))
    assert torch.equal(shift_pixels(x, "rot180"), torch.tensor([[[[0.3, 0.2], [0.1, 0.0]]]]))
    assert torch.equal(shift_pixels(x, "rot270"), torch.tensor([[[[0.2, 0.0], [0.3, 0.1]]]]))
    assert torch.equal(shift_pixels(x, "hflip"), torch.tensor([[[[0.1, 0.0], [0.3, 0.2]]]]))
    torch.testing.assert_close(shift_pixels(x, "invert"), torch.tensor([[[[1.0, 0.9], [0.8, 0.7]]]]))
    assert shift_pixels(x, "none") is x
    with pytest.raises(ValueError, match="unknown shift 'blur'"):
        shift_pixels(x, "blur")


def test_feature_shift_groups_see_their_shift_on_train_and_own_test_and_the_global_test_is_plain():
    from datamodules.federated import FeatureShiftFederatedDataModule, shift_pixels

    args = dict(dataset="digits", num_clients=6, partition="shards", shards_per_client=3, client_test_fraction=0.5,
                rounds_per_epoch=2, eval_batch_size=300, seed=0)  # fmt: skip
    plain, shifted = FederatedDataModule(**args), FeatureShiftFederatedDataModule(shifts=["none", "rot90", "invert"], **args)
    plain.setup(), shifted.setup()
    for c in range(6):
        shift = ["none", "rot90", "invert"][c % 3]
        assert shifted.client_shift(c) == shift
        for split in ("client_data", "client_test"):
            (xp, yp), (xs, ys) = getattr(plain, split)(c), getattr(shifted, split)(c)
            assert torch.equal(yp, ys) and len(ys) > 0
            torch.testing.assert_close(xs, plain.normalize(shift_pixels(plain.denormalize(xp), shift)))
            assert torch.equal(xs, xp) == (shift == "none")
    assert torch.equal(plain.val_sets[0].tensors[0], shifted.val_sets[0].tensors[0])
    assert shifted.describe()["federated"]["shifts"] == ["none", "rot90", "invert"]
    with pytest.raises(ValueError, match="unknown shifts \\['blur'\\]"):
        FeatureShiftFederatedDataModule(shifts=["none", "blur"], **args)


def test_paired_table_gives_fedselects_paired_difference_its_standard_error_and_client_counts():
    """Per seed FedSelect − method, mean ± standard error over seeds (hand-computed); clients counted where both
    rows are scored after local training; a row scored after broadcast (FedAvg + FT) gets no client count."""
    from recipes.comparisons.fedselect import paired_table

    def run(seed, local, broadcast, clients, configured=None):
        m = {"test/pacc_local": local, "test/pacc_broadcast": broadcast,
             "test/pacc": local if configured is None else configured}  # fmt: skip
        m.update({f"test/pacc_client{i}": a for i, a in enumerate(clients)})
        return {"seed": seed, "metrics": m}

    results = {
        "mnist/fedselect": [run(0, 0.90, 0.80, [0.9, 0.8]), run(1, 0.94, 0.90, [1.0, 0.9])],
        "mnist/local": [run(0, 0.88, 0.88, [0.8, 0.8]), run(1, 0.90, 0.90, [1.0, 1.0])],
        "mnist/fedavg_ft": [run(0, 0.95, 0.85, [0.9, 0.9], configured=0.85)],
    }
    rows = {tuple(c.strip() for c in line.split("|")[1:4]): line for line in paired_table(results).splitlines()}
    local = rows[("MNIST", "after local training (official)", "Local only (control)")]
    # differences 2 and 4 pp: mean 3.0, standard error stdev([2, 4]) / sqrt(2) = 1.414 / 1.414 = 1.0
    assert "| 89.0 ± 1.0 | 3.0 ± 1.0 | 1 / 1 |" in local  # client 0 up in seed 0, client 1 down in seed 1
    assert "| 89.0 ± 1.0 | -4.0 ± 4.0 | – |" in rows[("MNIST", "after broadcast", "Local only (control)")]
    ft = rows[("MNIST", "after local training (official)", "FedAvg + FT")]
    assert "| 1 | 95.0 ± nan | -5.0 ± nan | – |" in ft
