"""CounterFact-style evaluation of an edited language model (Meng et al., 2022; NAMET's strict and prefixed variants).

Per record: **efficacy** on the rewrite prompt and **paraphrase** on its paraphrases (is the new target preferred?),
**neighborhood** on held-out facts about other subjects (is each true target still preferred over the record's
new one?). *Loose* compares the mean per-token probability of the two targets, as CounterFact; *strict* requires
every target token to be the greedy choice under teacher forcing (NAMET's ``*_correct``). ``_prefix`` variants put
a random model-generated prefix before the prompt (NAMET's prefixed evaluation). Scores are averaged within a
record, then over records; ``score`` is the harmonic mean of efficacy, paraphrase and neighborhood; ``<metric>_se``
is the standard error of the mean over records (sample standard deviation / √n). **Fluency** is MEMIT's n-gram
entropy of sampled continuations.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import torch
from torch import nn
from torchmetrics import MeanMetric

from lightning_modules.ops.editing import harmonic_mean, ngram_entropy

LOOSE = ("efficacy", "paraphrase", "neighborhood", "efficacy_prefix", "neighborhood_prefix")
NAMES = (*LOOSE, "efficacy_strict", "paraphrase_strict", "neighborhood_strict", "efficacy_strict_prefix",
         "neighborhood_strict_prefix", "acc", "fluency")

Scorer = Callable[[list[str], list[str]], tuple[torch.Tensor, torch.Tensor]]


def strict_name(name: str) -> str:
    """``efficacy`` -> ``efficacy_strict``, ``efficacy_prefix`` -> ``efficacy_strict_prefix``."""
    base = name.replace("_prefix", "")
    return f"{base}_strict" + ("_prefix" if name.endswith("_prefix") else "")


class EditMetrics(nn.Module):
    """The editing metrics of one split, accumulated over batches of records (torchmetrics ``MeanMetric`` s, so
    they synchronise across processes). ``acc`` is the strict efficacy (the recipes' ``monitor``)."""

    def __init__(self):
        super().__init__()
        self.means = nn.ModuleDict({name: MeanMetric() for name in NAMES})
        self.per_record: dict[str, list[float]] = {}  # this process's per-record values (standard errors)
        self.case_ids: list[int] = []  # the records of per_record, in order
        self.last_per_record: dict[str, list] = {}  # per_record and case_id of the last compute() (paired tables)
        self.records = 0

    @staticmethod
    def queries(records: list, prefixes: list[str]) -> tuple[list[str], list[str], list]:
        """Prompts and targets to score (each prompt twice: new target, then true target) and, per record, the
        ``(metric, wanted target, index)`` of each prompt."""
        prompts, targets, per_record = [], [], []
        for r in records:
            prefix = prefixes[r.case_id % len(prefixes)] + ". " if prefixes else ""
            groups = {"efficacy": ([r.text], "new"), "paraphrase": (r.paraphrase_prompts, "new"),
                      "neighborhood": ([p for p, _ in r.neighborhood], "true")}
            if prefix:
                groups["efficacy_prefix"] = ([prefix + r.text], "new")
                groups["neighborhood_prefix"] = ([prefix + p for p, _ in r.neighborhood], "true")
            slots = []
            for name, (ps, want) in groups.items():
                for j, p in enumerate(ps):
                    true = r.neighborhood[j][1] if name.startswith("neighborhood") else r.target_true
                    slots.append((name, want, len(prompts)))
                    prompts += [p, p]
                    targets += [r.target_new, true]
            per_record.append(slots)
        return prompts, targets, per_record

    def update(self, records: list, score: Scorer, prefixes: list[str]) -> None:
        """Score ``records`` with ``score(prompts, targets) -> (mean NLL per token, strict)``."""
        prompts, targets, per_record = self.queries(records, prefixes)
        nll, strict = score(prompts, targets)
        for slots in per_record:
            per: dict[str, list[tuple[float, float]]] = {}
            for name, want, j in slots:
                new_better = bool(nll[j] < nll[j + 1])
                loose = new_better if want == "new" else not new_better
                hard = bool(strict[j]) if want == "new" else bool(strict[j + 1])
                per.setdefault(name, []).append((float(loose), float(hard)))
            for name, vals in per.items():
                loose, hard = (sum(v) / len(v) for v in zip(*vals))
                self.means[name].update(torch.tensor(loose))
                self.means[strict_name(name)].update(torch.tensor(hard))
                self.per_record.setdefault(name, []).append(loose)
                self.per_record.setdefault(strict_name(name), []).append(hard)
                if name == "efficacy":
                    self.means["acc"].update(torch.tensor(hard))
        self.case_ids += [int(r.case_id) for r in records]
        self.records += len(records)

    def update_fluency(self, texts: list[str]) -> None:
        for text in texts:
            self.means["fluency"].update(torch.tensor(ngram_entropy(text)))

    def compute(self) -> dict[str, float]:
        """Every metric seen since the last call (then reset), plus ``score``/``score_strict`` and ``records``."""
        values = {name: float(m.compute()) for name, m in self.means.items() if m.update_count}
        for m in self.means.values():
            m.reset()
        for name, vals in self.per_record.items():
            if len(vals) > 1:
                values[f"{name}_se"] = statistics.stdev(vals) / math.sqrt(len(vals))
        self.last_per_record = {"case_id": self.case_ids, **self.per_record} if self.case_ids else {}
        self.per_record, self.case_ids = {}, []
        for suffix in ("", "_strict"):
            parts = [values.get(f"{m}{suffix}") for m in ("efficacy", "paraphrase", "neighborhood")]
            if all(v is not None for v in parts):
                values[f"score{suffix}"] = harmonic_mean(parts)
        if self.records:
            values["records"] = float(self.records)
        self.records = 0
        return values
