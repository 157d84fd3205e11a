"""``python -m foundation.export_wmdp <out dir>``: export TAR's WMDP-bio setting (Tamirisa et al., arXiv 2408.00761) from
the Hugging Face hub into the local store that :class:`datamodules.tar_wmdp.TamperWMDPDataModule` reads
(:mod:`foundation.wmdp_store`).

Run it once on a machine with hub access and ``pip install -e .[cluster]`` (``datasets`` is a cluster-only
dependency); training then needs only the exported directory, offline. A source is
``HUB_ID[@REVISION][#CONFIG]:SPLIT:COLUMN[:FILTER_COLUMN=VALUE]``; a column holding a conversation (a list of
``{"from"|"role", "value"|"content"}`` messages) is stored as its messages' text joined by blank lines. Defaults,
from the official ``modules/dataloaders.py`` (rishub-tamirisa/tamper-resistance) and the research notes:

- forget text: ``lapisrocks/biology-pile-labeled`` rows with ``label == True`` (column ``txt_chunk``) and
  ``lapisrocks/camel-bio`` (assumed hub copy of the official CAMEL-AI biology CSV; column assumed
  ``camel_ai_message_2_text_chunk``, the CSV's);
- retain text: ``lapisrocks/biology-pile-labeled`` rows with ``label == False`` and
  ``lapisrocks/magpie-bio-filtered`` (assumed; column ``conversations``, Magpie's), capped by ``--max-per-source``;
- forget questions: ``cais/wmdp`` config ``wmdp-bio``, split ``test`` (``question``/``choices``/``answer``);
- retain questions: ``cais/mmlu`` config ``all``, split ``test``, without the 7 subjects TAR's evaluation
  excludes for bio (``--exclude-subjects``).

``meta.json`` records every source with the dataset commit it resolved to (or the revision asked for when the hub's
API cannot be reached) and its row count.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from foundation.wmdp_store import write_domain_store
from foundation.hub_export import load_split, require_datasets, resolve_revision

FORGET_TEXT = ("lapisrocks/biology-pile-labeled:train:txt_chunk:label=True",
               "lapisrocks/camel-bio:train:camel_ai_message_2_text_chunk")  # fmt: skip
RETAIN_TEXT = ("lapisrocks/biology-pile-labeled:train:txt_chunk:label=False",
               "lapisrocks/magpie-bio-filtered:train:conversations")  # fmt: skip
FORGET_QUESTIONS = "cais/wmdp#wmdp-bio:test"
RETAIN_QUESTIONS = "cais/mmlu#all:test"
# TAR's retain MMLU for bio drops these (red_teaming/mmlu_eval/categories.py, as quoted in the research notes)
BIO_SUBJECTS = ("college_biology", "high_school_biology", "medical_genetics", "virology", "college_medicine",
                "anatomy", "clinical_knowledge")  # fmt: skip


@dataclass(frozen=True)
class HubSource:
    """One hub dataset split (and, for text, its column and an optional equality filter)."""

    hub_id: str
    split: str
    column: str | None = None
    config: str | None = None
    revision: str | None = None
    where: tuple[str, str] | None = None

    @classmethod
    def parse(cls, spec: str, text: bool = True) -> HubSource:
        """``HUB_ID[@REVISION][#CONFIG]:SPLIT[:COLUMN[:FILTER_COLUMN=VALUE]]`` (a column is required for text)."""
        parts = spec.split(":")
        if len(parts) < (3 if text else 2) or len(parts) > (4 if text else 2) or not all(parts):
            form = "HUB_ID[@REVISION][#CONFIG]:SPLIT" + (":COLUMN[:FILTER_COLUMN=VALUE]" if text else "")
            raise ValueError(f"bad source {spec!r}: expected {form}")
        head, split = parts[0], parts[1]
        head, _, config = head.partition("#")
        hub_id, _, revision = head.partition("@")
        where = None
        if len(parts) == 4:
            key, eq, value = parts[3].partition("=")
            if not eq or not key:
                raise ValueError(f"bad filter {parts[3]!r} in {spec!r}: expected FILTER_COLUMN=VALUE")
            where = (key, value)
        return cls(hub_id, split, parts[2] if text else None, config or None, revision or None, where)

    def load(self):
        """``(dataset, commit)``: the split at the commit its revision resolves to now (so meta.json names what was
        read), its columns checked."""
        require_datasets()
        commit = resolve_revision(self.hub_id, self.revision)
        needed = [c for c in (self.column, self.where and self.where[0]) if c]
        return load_split(self.hub_id, self.config, self.split, commit, needed, "fix the source spec"), commit

    def record(self, commit: str, rows: int) -> dict:
        """This source as ``meta.json`` records it."""
        return {**asdict(self), "requested_revision": self.revision, "revision": commit, "rows": rows}


def as_text(value) -> str:
    """A text cell, or a conversation (list of messages) joined by blank lines."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return "\n\n".join(str(m.get("value", m.get("content", ""))) for m in value)
    raise ValueError(f"cannot read text from a {type(value).__name__} cell: {str(value)[:80]!r}")


def iter_texts(sources: list[HubSource], max_per_source: int | None, log: list[dict]) -> Iterator[tuple[str, str]]:
    """``(text, source)`` of every kept row (filter applied, empty texts dropped); appends each source's record
    (:meth:`HubSource.record`) to ``log`` once it is read."""
    for src in sources:
        (ds, commit), n = src.load(), 0
        for row in ds:
            if src.where is not None and str(row[src.where[0]]) != src.where[1]:
                continue
            text = as_text(row[src.column]).strip()
            if not text:
                continue
            yield text, src.hub_id
            n += 1
            if max_per_source is not None and n >= max_per_source:
                break
        log.append(src.record(commit, n))


def iter_questions(src: HubSource, exclude_subjects: tuple[str, ...], log: list[dict]) -> Iterator[dict]:
    """Question records of a ``question``/``choices``/``answer`` (and optional ``subject``) split, without
    ``exclude_subjects``; appends the source's record to ``log`` once it is read."""
    (ds, commit), n = src.load(), 0
    missing = [c for c in ("question", "choices", "answer") if c not in ds.column_names]
    if missing:
        raise ValueError(f"{src.hub_id} [{src.split}] has no column {missing}; its columns are {ds.column_names}")
    for row in ds:
        topic = str(row.get("subject") or "")
        if topic in exclude_subjects:
            continue
        n += 1
        yield {"question": row["question"], "choices": list(row["choices"]), "answer": int(row["answer"]),
               "subject": topic}  # fmt: skip
    log.append(src.record(commit, n))


def export(
    out_dir: str | Path,
    forget_text: list[str] = list(FORGET_TEXT),  # noqa: B006 (read-only)
    retain_text: list[str] = list(RETAIN_TEXT),  # noqa: B006
    forget_questions: str = FORGET_QUESTIONS,
    retain_questions: str = RETAIN_QUESTIONS,
    exclude_subjects: tuple[str, ...] = BIO_SUBJECTS,
    max_per_source: int | None = None,
) -> Path:
    """Load the sources with ``datasets`` and write them to ``out_dir`` (see the module docstring)."""
    texts = {"forget": [HubSource.parse(s) for s in forget_text], "retain": [HubSource.parse(s) for s in retain_text]}
    questions = {"forget_questions": (HubSource.parse(forget_questions, text=False), ()),
                 "retain_questions": (HubSource.parse(retain_questions, text=False), tuple(exclude_subjects))}
    sources: dict[str, list[dict]] = {stem: [] for stem in (*texts, *questions)}  # filled while the files are written
    return write_domain_store(
        out_dir,
        {stem: iter_texts(srcs, max_per_source, sources[stem]) for stem, srcs in texts.items()},
        {stem: iter_questions(src, skip, sources[stem]) for stem, (src, skip) in questions.items()},
        sources=sources,
        extra={"excluded_subjects": list(exclude_subjects)},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m foundation.export_wmdp", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="output directory (e.g. data/wmdp_bio)")
    parser.add_argument("--forget-text", nargs="+", default=list(FORGET_TEXT), metavar="SOURCE",
                        help="forget-domain corpora (HUB_ID[@REV][#CONFIG]:SPLIT:COLUMN[:COL=VALUE])")
    parser.add_argument("--retain-text", nargs="+", default=list(RETAIN_TEXT), metavar="SOURCE", help="retain corpora")
    parser.add_argument("--forget-questions", default=FORGET_QUESTIONS, metavar="SOURCE",
                        help="forget multiple-choice questions (HUB_ID[@REV][#CONFIG]:SPLIT)")
    parser.add_argument("--retain-questions", default=RETAIN_QUESTIONS, metavar="SOURCE",
                        help="retain multiple-choice questions")
    parser.add_argument("--exclude-subjects", nargs="*", default=list(BIO_SUBJECTS),
                        help="retain-question subjects to drop (default: TAR's 7 bio-related MMLU subjects)")
    parser.add_argument("--max-per-source", type=int, default=None, help="keep only the first N texts per corpus")
    args = parser.parse_args(argv)
    path = export(args.out_dir, args.forget_text, args.retain_text, args.forget_questions, args.retain_questions,
                  tuple(args.exclude_subjects), args.max_per_source)  # fmt: skip
    print(f"exported TAR's WMDP-bio domains -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
