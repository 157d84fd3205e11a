"""TAR (Tamirisa et al., "Tamper-Resistant Safeguards for Open-Weight LLMs", ICLR 2025, arXiv 2408.00761) and its
initial safeguard, Random Mapping (the other safeguards it is compared with, and their base, are in
:mod:`lightning_modules.safeguards`, re-exported here).

TAR trains the weights so that fine-tuning adversaries *fail to restore* removed knowledge while retain
performance holds. After an initial safeguard (Random Mapping: hidden states of forget text are pushed towards
fixed random vectors), every outer step (official ``tar_training_loop``):

1. snapshots the weights ``theta``;
2. samples an adversary (optimizer, learning rate, ``K`` steps, forget or retain-then-forget data) and runs its
   ``K`` steps from ``theta``, with a fresh optimizer;
3. every ``tr_every`` inner steps, at the attacked weights ``theta'``, back-propagates the tamper-resistance loss
   ``L_TR = -entropy`` on held-out forget data, weighted ``exp(lambda (k - K + 1))`` and scaled by ``tr_scale``,
   and accumulates that gradient (first order: it is applied to ``theta`` as if taken there);
4. restores ``theta`` exactly and drops the adversary's optimizer;
5. adds the retain loss (LM loss plus the L2 distance of hidden states to the frozen original model) and the
   accumulated TR gradient, and steps the outer optimizer.

The snapshot and the TR-gradient buffers are allocated once and reused, so memory stays flat across outer steps.
Every recipe evaluates forget and retain multiple-choice accuracy (``TamperFactsDataModule``); ``acc`` is the retain
accuracy (the safeguard's utility), ``forget_acc`` the knowledge it should remove. Tamper resistance itself is
measured by ``callbacks.TamperingHarness`` after training.

Matched to the official code (``rishub-tamirisa/tamper-resistance@19de233``; knobs, official by default): the TR
entropy over every token (``tr_tokens``); Random Mapping and the representation term averaged over every hidden state
(``hidden_states``); one adversary per outer step on every rank (:func:`lightning_modules.tamper.draw_adversary`);
the training adversaries drawn as data type x learning rate (:class:`lightning_modules.tamper.AdversarySpace`); the
outer optimizer is the injected one (the configs: ``schedulefree.AdamWScheduleFree``, lr 2e-5, 32 warm-up steps, as
``tar.py``: ``schedulefree.AdamWScheduleFree(model.parameters(), lr=args.lr, warmup_steps=args.warmup_steps)`` with
``run_tar_bio.sh``'s ``--lr 2e-05 --warmup_steps 32``). Differences: the model may train only its top blocks
(``SplitCausalLM``) with the trunk's output cached; pads never count (the official batches are padded to 256 tokens
and every position of the entropy counts); one adversary per outer step (``tar_num_tasks_sampled 1``, as the run
scripts) and no TR-loss lower bound (the scripts pass ``--unbounded``).
"""

from __future__ import annotations

from typing import Literal

import torch

from lightning_modules.nets.split_lm import SplitCausalLM
from lightning_modules.ops import tar as ops
from lightning_modules.safeguards import GradientAscent, NoSafeguard, RandomReinit, Safeguard
from lightning_modules.tamper import (
    AdversarySpace,
    TamperAttack,
    check_training_adversaries,
    draw_adversary,
    lm_loss,
    token_logits,
    trim,
)

__all__ = ["GradientAscent", "NoSafeguard", "RandomMapping", "RandomReinit", "Safeguard", "TAR"]


class RandomMapping(Safeguard):
    """Random Mapping (TAR's initial safeguard, official ``random_mapping_training_loop``): the hidden states of
    every token of forget text are pushed towards a fixed random vector of its token id (``1 - |cos|``, over the
    trained blocks' outputs), while the retain LM loss holds.

    Args:
        model: the causal LM (see :class:`Safeguard`, whose other arguments pass through).
        mapping_weight: weight of the random-mapping cosine loss.
        mapping_seed: seed of the random table ``H`` (vocabulary x hidden size).
        hidden_states: the layers the cosine loss (and TAR's representation term) average over: ``all`` hidden
            states, the embeddings' included, as official (``modules/objectives.py``: ``outputs = model(**_x_f,
            output_hidden_states=True)``; the frozen ones add constants, so the trained blocks' terms are summed and
            divided by ``net.num_hidden_states``), or the ``trained`` blocks' outputs only.
    """

    def __init__(
        self,
        model: SplitCausalLM,
        mapping_weight: float = 1.0,
        mapping_seed: int = 0,
        hidden_states: Literal["all", "trained"] = "all",
        **kwargs,
    ):
        super().__init__(model=model, **kwargs)
        self.mapping_weight, self.mapping_seed, self.hidden_states = mapping_weight, mapping_seed, hidden_states

    @property
    def num_states(self) -> int | None:
        """The denominator of the per-layer means (``None``: the layers given)."""
        return self.net.num_hidden_states if self.hidden_states == "all" else None

    def after_build(self) -> None:
        cfg = self.net.lm.config
        gen = torch.Generator().manual_seed(self.mapping_seed)
        table = torch.randn(cfg.vocab_size, cfg.hidden_size, generator=gen)
        self.register_buffer("random_table", table, persistent=False)

    def random_mapping_loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        ids, mask = trim(batch[0], batch[1])
        _, hidden = self.net(ids, mask)
        return ops.random_mapping_loss(hidden, self.random_table[ids].to(hidden[0].dtype), mask, self.num_states)

    def safeguard_loss(self, batch: dict) -> torch.Tensor:
        mapping = self.random_mapping_loss(batch["forget"])
        self.log("train/random_mapping", mapping.detach())
        return self.mapping_weight * mapping + self.retain_weight * lm_loss(self.net, batch["retain"], False)


class TAR(RandomMapping):
    """TAR: first-order adversarial meta-learning against sampled fine-tuning adversaries (see the module
    docstring). The first ``random_mapping_steps`` training steps are Random Mapping steps (or start from a
    Random Mapping artifact with ``init_from``); every later step is one outer step.

    Args:
        model: the causal LM (see :class:`Safeguard`; the arguments of :class:`RandomMapping` pass through).
        adversaries: training adversaries (they fine-tune the trained parameters) sampled by each one's ``weight``;
            one is drawn per outer step and shared by every rank.
        adversary_space: instead of ``adversaries``, the space they are drawn from as official: data type x
            learning rate (:class:`AdversarySpace`; official bio: AdamW at 2e-6 / 2e-5 / 4e-5, K = 64, forget or
            retain-then-forget).
        tr_every: TR loss every this many inner steps (``tar_inner_loop_subsample``, official 4).
        schedule_lambda: ``lambda`` of the inner-step weights (official 0.0625; 0: equal weights).
        tr_scale: scale of the TR loss (``tar_tamper_resistance_grad_scale``, official 4.0).
        retain_scale: scale of the retain loss (``tar_retain_scale``, official 1.0).
        representation_weight: weight of the hidden-state distance to the original model in the retain loss
            (official: 1 with ``--retain_representations``).
        meta_batch_size: held-out forget sentences ``x_TR`` per outer step (fixed across its inner steps).
        random_mapping_steps: Random Mapping steps before the outer steps.
        tr_tokens: where the TR entropy is taken on ``x_TR``: every token (``all``, official
            ``max_entropy_loss(outputs.logits)``) or the positions that predict answer tokens (``answer``).
    """

    def __init__(
        self,
        model: SplitCausalLM,
        adversaries: list[TamperAttack] | None = None,
        adversary_space: AdversarySpace | None = None,
        tr_every: int = 4,
        schedule_lambda: float = 0.0625,
        tr_scale: float = 4.0,
        retain_scale: float = 1.0,
        representation_weight: float = 1.0,
        meta_batch_size: int = 8,
        random_mapping_steps: int = 0,
        tr_tokens: Literal["all", "answer"] = "all",
        **kwargs,
    ):
        super().__init__(model=model, **kwargs)
        if (adversaries is None) == (adversary_space is None):
            raise ValueError("TAR needs exactly one of adversaries (a list) and adversary_space")
        self.adversaries = adversary_space if adversary_space is not None else list(adversaries or [])
        check_training_adversaries(self.adversaries, tr_every)
        self.tr_every, self.schedule_lambda, self.tr_scale = tr_every, schedule_lambda, tr_scale
        self.retain_scale, self.representation_weight = retain_scale, representation_weight
        self.meta_batch_size, self.random_mapping_steps = meta_batch_size, random_mapping_steps
        self.tr_tokens = tr_tokens
        self.__dict__["reference"] = None  # frozen original model (not a submodule: never trained, never saved)
        self._snapshot: list[torch.Tensor] | None = None
        self._tr_grad: list[torch.Tensor] | None = None
        self._gen: torch.Generator | None = None
        self._adversary_gen: torch.Generator | None = None
        self._restored_generators: dict | None = None

    def after_build(self) -> None:
        super().after_build()
        reference = self.net.copy().requires_grad_(False)  # the original weights, before init_from is loaded
        self.__dict__["reference"] = reference

    def on_fit_start(self) -> None:
        self.reference.to(self.device)
        self.seed_generators(torch.initial_seed(), self.global_rank)
        if self._restored_generators is not None:  # a resumed run continues the interrupted run's draws
            self.restore_generators(self._restored_generators, self.global_rank)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The generators' states travel with the checkpoint, so that a run resumed after a preemption (750 outer
        steps take hours) draws the adversaries and ``x_TR`` batches the uninterrupted run would have drawn."""
        if self._adversary_gen is not None and self._gen is not None:
            checkpoint["tar_generators"] = {"adversary": self._adversary_gen.get_state(), "data": self._gen.get_state()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._restored_generators = checkpoint.get("tar_generators")

    def restore_generators(self, state: dict, rank: int) -> None:
        """Continue the saved draws. The adversary generator is the same on every rank; the data generator saved is
        rank 0's, so another rank reseeds its own from the step reached (its batches still differ from rank 0's
        and from the ones it read before the interruption)."""
        self._adversary_gen.set_state(state["adversary"])
        if rank == 0:
            self._gen.set_state(state["data"])
        else:
            self._gen.manual_seed(torch.initial_seed() + rank + 7919 * (self.global_step + 1))

    def seed_generators(self, seed: int, rank: int) -> None:
        """The data generator (``x_TR`` and the adversaries' batches) differs per rank, as each official rank reads
        its own batches; the adversary generator does not depend on the rank, and :func:`draw_adversary` broadcasts
        rank 0's draw as well."""
        self._gen = torch.Generator().manual_seed(seed + rank)
        self._adversary_gen = torch.Generator().manual_seed(seed + 0x5EED)

    def draw_adversary(self) -> tuple[TamperAttack, int]:
        """This outer step's adversary and its number of retain steps, the same on every rank."""
        if self._adversary_gen is None:
            self.seed_generators(torch.initial_seed(), self.global_rank)
        return draw_adversary(self.adversaries, self._adversary_gen)

    def make_adversary_optimizer(self, adversary: TamperAttack, params: list[torch.nn.Parameter]):
        """A fresh optimizer for this outer step's adversary (a hook: tests check it never outlives the step)."""
        return adversary.make_optimizer(params)

    def adversary_loss(self, batch: list[torch.Tensor], completion_only: bool) -> torch.Tensor:
        """The adversary's LM loss on one of its batches."""
        return lm_loss(self.net, batch, completion_only)

    def tr_loss(self, x_tr: list[torch.Tensor]) -> torch.Tensor:
        """The tamper-resistance loss at the current (attacked) weights: minus the entropy on ``x_TR``."""
        return ops.entropy_loss(token_logits(self.net, x_tr, self.tr_tokens))

    def retain_loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """LM loss plus the distance of the hidden states to the original model's (:attr:`hidden_states`)."""
        ids, mask, _ = trim(*batch)
        h, hidden = self.net(ids, mask)
        sel = mask[:, 1:]
        lm = torch.nn.functional.cross_entropy(self.net.logits(h[:, :-1][sel]).float(), ids[:, 1:][sel])
        with torch.no_grad():
            _, ref = self.reference(ids, mask)
        dist = ops.representation_distance(hidden, ref, mask, self.num_states)
        self.log_dict({"train/retain_lm": lm.detach(), "train/retain_distance": dist.detach()})
        return lm + self.representation_weight * dist

    def training_step(self, batch: dict, batch_idx: int) -> None:
        if self.global_step < self.random_mapping_steps:
            return super().training_step(batch, batch_idx)
        self.outer_step(batch)

    def outer_step(self, batch: dict) -> None:
        opt, dm = self.optimizers(), self.trainer.datamodule
        params = self.trained_parameters()
        if self._snapshot is None:  # allocated once, reused by every outer step
            self._snapshot = [p.detach().clone() for p in params]
            self._tr_grad = [torch.zeros_like(p) for p in params]
        with torch.no_grad():
            for buf, p in zip(self._snapshot, params):
                buf.copy_(p)
            for g in self._tr_grad:
                g.zero_()
        adversary, retain_steps = self.draw_adversary()
        weights = ops.inner_step_weights(adversary.steps, self.tr_every, self.schedule_lambda)
        x_tr = [t.to(self.device) for t in dm.sample("forget_meta", self.meta_batch_size, self._gen)]
        inner = self.make_adversary_optimizer(adversary, params)
        tr_total, adv_loss = 0.0, torch.zeros(())
        for k, adv_batch in enumerate(adversary.batches(dm, "forget_train", self._gen, retain_steps)):
            batch_k = [t.to(self.device) for t in adv_batch]
            adv_loss = self.through_wrapper("adversary_loss", batch_k, adversary.completion_only)
            inner.zero_grad(set_to_none=True)
            self.manual_backward(adv_loss)
            inner.step()
            if k in weights:
                inner.zero_grad(set_to_none=True)
                tr = self.through_wrapper("tr_loss", x_tr)
                self.manual_backward(tr * (self.tr_scale * weights[k]))
                with torch.no_grad():
                    for acc, p in zip(self._tr_grad, params):
                        if p.grad is not None:
                            acc.add_(p.grad)
                tr_total += weights[k] * tr.item()
        inner.zero_grad(set_to_none=True)
        del inner  # the adversary's optimizer state dies with this outer step
        with torch.no_grad():
            for p, buf in zip(params, self._snapshot):
                p.copy_(buf)
        retain = self.through_wrapper("retain_loss", batch["retain"])
        opt.zero_grad()
        self.manual_backward(self.retain_scale * retain)
        with torch.no_grad():
            for p, g in zip(params, self._tr_grad):
                p.grad = g.clone() if p.grad is None else p.grad.add_(g)
        opt.step()
        self.log_dict({"train/tr_loss": tr_total, "train/adversary_loss": adv_loss.detach(),
                       "train/retain_loss": retain.detach(), "train/adversary_lr": adversary.lr,
                       "train/adversary_retain_steps": float(retain_steps)}, prog_bar=False)  # fmt: skip
