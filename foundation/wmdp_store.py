"""A local store of forget/retain text domains and their multiple-choice questions, exported from the hub for TAR
(Tamirisa et al., arXiv 2408.00761) on WMDP-bio (Li et al., "The WMDP Benchmark", arXiv 2403.03218). No Lightning.

``datasets`` is a cluster-only dependency, so ``python -m foundation.export_wmdp`` writes the hub data once into a
directory of this format, and training (:class:`datamodules.tar_wmdp.TamperWMDPDataModule`) reads it with the
standard library alone:

``<dir>/forget.jsonl``, ``<dir>/retain.jsonl``
    one ``{"text": str, "source": str}`` per line: the forget-domain corpus (TAR-bio: bio-labelled Pile chunks and
    CAMEL biology) and the retain corpus.
``<dir>/forget_questions.jsonl``, ``<dir>/retain_questions.jsonl``
    one ``{"question": str, "choices": [str, ...], "answer": int, "subject": str}`` per line (``answer`` indexes
    ``choices``): WMDP-bio and the retain benchmark (MMLU without the biology subjects).
``<dir>/meta.json``
    ``{"format": "safeweights-tamper-domains", "version": 1, "sources": {file stem: [{hub_id, config, split,
    column, where, requested_revision, revision (the commit read), rows}]}, "files": {file stem: {"rows",
    "sha256"}}}``; written last, so a directory without it is an unfinished export. The readers check each file's row count and SHA-256, so a truncated or
    edited file is refused.

Files are written atomically (:func:`foundation.artifacts.atomic_open`), as the sibling text-classification store
(:mod:`foundation.text_store`) does; its one-label rows cannot hold multiple-choice questions, hence this format.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from foundation import store_meta

FORMAT = "safeweights-tamper-domains"
VERSION = 1
TEXT_FILES = ("forget", "retain")
QUESTION_FILES = ("forget_questions", "retain_questions")
EXPORT_HINT = (
    "export it on a machine with hub access: `python -m foundation.export_wmdp {dir}` "
    "(needs `pip install -e .[cluster]`; see docs/cluster.md)"
)


class DomainStoreNotFoundError(store_meta.StoreNotFoundError):
    """An exported domain directory is missing or unfinished; the message names the export command."""


@dataclass(frozen=True)
class Question:
    """One multiple-choice question: ``choices[answer]`` is correct."""

    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str = ""


def _check_text(record, where: str) -> str:
    if not isinstance(record, dict) or not isinstance(record.get("text"), str) or not record["text"].strip():
        raise ValueError(f'{where}: expected {{"text": non-empty string, "source": ...}}, got {str(record)[:80]!r}')
    return record["text"]


def _check_question(record, where: str) -> Question:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {str(record)[:80]!r}")  # noqa: TRY004 (bad data)
    question, choices, answer = record.get("question"), record.get("choices"), record.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: 'question' must be a non-empty string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"{where}: 'choices' must be a list of at least 2 strings, got {choices!r}")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ValueError(f"{where}: 'answer' must be an index into the {len(choices)} choices, got {answer!r}")
    return Question(question, tuple(choices), answer, str(record.get("subject", "")))


def write_domain_store(
    directory: str | Path,
    texts: dict[str, Iterable[tuple[str, str]]],
    questions: dict[str, Iterable[dict]],
    sources: dict[str, list[dict]] | None = None,
    extra: dict | None = None,
) -> Path:
    """Write a store. ``texts`` maps ``forget``/``retain`` to ``(text, source)`` pairs, ``questions`` maps
    ``forget_questions``/``retain_questions`` to question records; both are streamed line by line (a record is
    checked before it is written). ``sources`` (per file stem: what it was exported from) and ``extra`` go into
    ``meta.json``, which is written last: ``sources`` is read only then, so the record iterators may fill it in."""
    directory = Path(directory)
    if set(texts) != set(TEXT_FILES) or set(questions) != set(QUESTION_FILES):
        raise ValueError(f"a domain store needs texts {TEXT_FILES} and questions {QUESTION_FILES}, "
                         f"got {sorted(texts)} and {sorted(questions)}")  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "meta.json").unlink(missing_ok=True)
    files = {}
    for stem, rows in [*texts.items(), *questions.items()]:

        def records(stem: str = stem, rows=rows):
            for n, row in enumerate(rows, start=1):
                where = f"{stem} record {n}"
                if stem in TEXT_FILES:
                    text, source = row
                    yield {"text": _check_text({"text": text}, where), "source": source}
                else:
                    q = _check_question(row, where)
                    yield {"question": q.question, "choices": list(q.choices), "answer": q.answer, "subject": q.subject}

        files[stem] = store_meta.write_jsonl(directory / f"{stem}.jsonl", records())
        if files[stem]["rows"] == 0:
            raise ValueError(f"{stem}: no records to write (check the export's sources and filters)")
    meta = {"format": FORMAT, "version": VERSION, "sources": sources or {}, "files": files, **(extra or {})}
    store_meta.write_meta(directory, meta)
    return directory


def read_meta(directory: str | Path) -> dict:
    """The store's ``meta.json``; raises :class:`DomainStoreNotFoundError` (naming the export command) if absent."""
    return store_meta.read_meta(directory, FORMAT, VERSION, "exported WMDP-style data", EXPORT_HINT.format(dir=directory),
                                DomainStoreNotFoundError)


def _read(directory: str | Path, stem: str, check, limit: int | None) -> list:
    """``check(record, "file:line")`` of every line (the first ``limit`` returned); the file must match the row count
    and SHA-256 that meta.json records."""
    meta, path = read_meta(directory), Path(directory) / f"{stem}.jsonl"
    expected = meta["files"].get(stem)
    if expected is None or not path.is_file():
        raise DomainStoreNotFoundError(f"{path} is missing from the export: " + EXPORT_HINT.format(dir=directory))
    out = store_meta.read_jsonl(path, expected, "re-export it with foundation.export_wmdp",
                                check=lambda record, number: check(record, f"{path}:{number}"))
    return out if limit is None else out[:limit]


def read_texts(directory: str | Path, stem: str, limit: int | None = None) -> list[str]:
    """The texts of ``forget``/``retain`` (the first ``limit`` lines); a malformed line raises naming file and line."""
    if stem not in TEXT_FILES:
        raise ValueError(f"unknown text file {stem!r}; choose from {TEXT_FILES}")
    return _read(directory, stem, _check_text, limit)


def read_questions(directory: str | Path, stem: str, limit: int | None = None) -> list[Question]:
    """The questions of ``forget_questions``/``retain_questions`` (the first ``limit`` lines)."""
    if stem not in QUESTION_FILES:
        raise ValueError(f"unknown question file {stem!r}; choose from {QUESTION_FILES}")
    return _read(directory, stem, _check_question, limit)
