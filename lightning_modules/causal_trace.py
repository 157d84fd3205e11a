"""Causal tracing (Meng et al., "Locating and Editing Factual Associations in GPT", NeurIPS 2022, arXiv 2202.05262):
where in the network does a causal LM recall a fact? The tool MEMIT uses to choose its edited layers.

For a fact the model states (prompt with a subject, answer ``o``): a **clean** run gives ``p(o)``; a **corrupted**
run adds Gaussian noise ``ε ~ N(0, ν²)`` to the embeddings of the subject's tokens (``ν`` = ``noise_factor`` x the
standard deviation of the subject-token embeddings, 3 in ROME), which lowers ``p(o)``; a **restored** run is the
corrupted run with one state at the subject's last token replaced by its clean value. The indirect effect of that
state is ``p_restored(o) - p_corrupted(o)``. ``kind="hidden"`` restores the output of block ``l`` (the residual
stream), ``kind="mlp"`` the MLP outputs of a window of ``window`` blocks centred on ``l`` (ROME uses 10 for its
48-layer GPT-2 XL). MEMIT edits the MLPs of the layers where the MLP effect at the last subject token peaks.

One forward pass per fact and noise sample restores every layer at once (one row per layer, the same noise in
each row), so a 30-layer model costs ``samples`` passes of ``num_layers + 1`` short rows per fact.

    OMP_NUM_THREADS=1 python -m lightning_modules.causal_trace --facts 40 --samples 3 --out runs/causal_trace
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
from pathlib import Path
from typing import Literal

import torch

from lightning_modules.editing_stats import hooks
from lightning_modules.memit import _hidden, _with_hidden
from lightning_modules.ops.editing import best_layer_window


@torch.no_grad()
def trace_fact(lm, ids: list[int], subject: tuple[int, int], answer: int, nu: float, samples: int,
               kind: Literal["hidden", "mlp"], window: int, layer_tmp: str, mlp_tmp: str, embed_path: str,
               generator: torch.Generator) -> dict[str, torch.Tensor | float]:
    """Clean, corrupted and per-layer restored ``p(answer)`` of one fact (``ids``: prompt tokens, ``subject``: the
    subject's token range ``[b, e)``); ``restored`` is ``[num_layers]``, averaged over ``samples`` noise draws."""
    n = lm.config.num_hidden_layers
    x = torch.tensor([ids])
    b, e = subject
    last = e - 1
    clean_h, clean_mlp = {}, {}

    def keep(store, l):
        def fn(module, inputs, output):
            store[l] = _hidden(output)[0, last].clone()
        return fn

    recs = {layer_tmp.format(l): keep(clean_h, l) for l in range(n)}
    recs.update({mlp_tmp.format(l): keep(clean_mlp, l) for l in range(n)})
    with hooks(lm, recs):
        p_clean = float(lm(input_ids=x).logits[0, -1].float().softmax(-1)[answer])
    rows = n + 1  # row 0: corrupted only; row l+1: layer l restored
    xb = x.expand(rows, -1)
    restore = {}  # module path -> rows whose output at `last` is restored from `store[l]`
    for l in range(n):
        if kind == "hidden":
            restore.setdefault((layer_tmp.format(l), l), []).append(l + 1)
        else:
            lo, hi = max(0, l - window // 2), min(n, l - (-window // 2))
            for j in range(lo, hi):
                restore.setdefault((mlp_tmp.format(j), j), []).append(l + 1)
    corrupted, restored = [], []
    for _ in range(samples):
        eps = torch.randn(e - b, lm.config.hidden_size, generator=generator) * nu

        def noise(module, inputs, output):
            out = output.clone()
            out[:, b:e] += eps.to(out.dtype)
            return out

        def put(l, rws, store):
            def fn(module, inputs, output):
                h = _hidden(output).clone()
                h[rws, last] = store[l].to(h.dtype)
                return _with_hidden(output, h)
            return fn

        fns = {embed_path: noise}
        for (path, l), rws in restore.items():
            fns[path] = put(l, rws, clean_h if kind == "hidden" else clean_mlp)
        with hooks(lm, fns):
            p = lm(input_ids=xb).logits[:, -1].float().softmax(-1)[:, answer]
        corrupted.append(float(p[0]))
        restored.append(p[1:])
    return {"clean": p_clean, "corrupted": statistics.fmean(corrupted), "restored": torch.stack(restored).mean(0)}


def subject_std(lm, token_lists: list[list[int]]) -> float:
    """Standard deviation of the input embeddings of the given tokens (ROME's ``collect_embedding_std``)."""
    emb = lm.get_input_embeddings().weight
    rows = torch.tensor(sorted({t for ts in token_lists for t in ts}))
    return float(emb[rows].float().std())


def run(facts: int, samples: int, kinds: list[str], window: int, noise_factor: float, seed: int, out: Path,
        widths: list[int], known_dtype: str = "float32") -> dict:
    """Trace ``facts`` known country facts of SmolLM2-135M (the editing records' source) and write
    ``out/causal_trace.json`` and ``out/causal_trace.png``; returns the summary."""
    from datamodules import CounterFactDataModule
    from lightning_modules import MEMIT, CausalLM

    torch.manual_seed(seed)
    # the known-fact filter runs in ``known_dtype`` (its cache is shared with editing runs of that compute dtype);
    # the traces themselves run in the model's float32
    m = MEMIT(CausalLM("smollm2-135m", attn_implementation="eager", bos_token="<|endoftext|>"), fluency_records=0,
              eval_prefixes=0, context_seeds=[], compute_dtype=known_dtype)
    m.configure_model()
    dm = CounterFactDataModule(num_edits=facts, relations=["city_country", "us_state", "capital", "continent",
                                                          "currency", "language"], seed=seed)
    dm.select_known(m.knows)
    lm, net = m.lm, m.net
    items = []
    for r in dm.records:
        ids = net.encode(r.text)
        first = len(net.encode(r.prompt[: r.prompt.index("{}")].rstrip()))  # bos and the words before the subject
        items.append((ids, (first, net.subject_last(r.prompt, r.subject) + 1), net.encode_target(r.text, r.target_true)[0]))
    nu = noise_factor * subject_std(lm, [ids[b:e] for ids, (b, e), _ in items])
    g = torch.Generator().manual_seed(seed)
    summary = {"facts": len(items), "samples": samples, "noise_std": nu, "window": window, "seed": seed}
    for kind in kinds:
        per = [trace_fact(lm, ids, span, ans, nu, samples, kind, window, "model.layers.{}", "model.layers.{}.mlp",
                          "model.embed_tokens", g) for ids, span, ans in items]
        eff = torch.stack([p["restored"] - p["corrupted"] for p in per])  # [facts, layers]
        mean, se = eff.mean(0), eff.std(0) / math.sqrt(len(per))
        summary[kind] = {"effect": mean.tolist(), "se": se.tolist(),
                         "p_clean": statistics.fmean(p["clean"] for p in per),
                         "p_corrupted": statistics.fmean(p["corrupted"] for p in per),
                         "best_windows": {str(w): best_layer_window(mean, w) for w in widths}}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "causal_trace.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out / "causal_trace.json")
    plot(summary, kinds, out / "causal_trace.png")
    return summary


def plot(summary: dict, kinds: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    for kind in kinds:
        mean, se = summary[kind]["effect"], summary[kind]["se"]
        xs = list(range(len(mean)))
        label = kind if kind == "hidden" else f"mlp (window {summary['window']})"
        ax.errorbar(xs, mean, yerr=se, fmt="o-", ms=3, capsize=2, label=label)
    ax.set_xlabel("layer (restored at the subject's last token)")
    ax.set_ylabel("indirect effect on p(answer)")
    ax.set_title(f"SmolLM2-135M causal trace, {summary['facts']} known facts, {summary['samples']} noise draws", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--facts", type=int, default=40, help="known country facts traced")
    ap.add_argument("--samples", type=int, default=3, help="noise draws per fact")
    ap.add_argument("--kinds", nargs="+", default=["mlp", "hidden"], choices=["mlp", "hidden"])
    ap.add_argument("--window", type=int, default=5, help="MLP layers restored around each layer (kind mlp)")
    ap.add_argument("--noise-factor", type=float, default=3.0, help="noise std in units of the embeddings' std")
    ap.add_argument("--widths", type=int, nargs="+", default=[2, 5], help="layer-window widths to choose")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/causal_trace"))
    ap.add_argument("--known-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="compute dtype of the known-fact filter (shares its cache with editing runs)")
    a = ap.parse_args(argv)
    s = run(a.facts, a.samples, a.kinds, a.window, a.noise_factor, a.seed, a.out, a.widths, a.known_dtype)
    for kind in a.kinds:
        k = s[kind]
        print(f"{kind}: p_clean {k['p_clean']:.3f} p_corrupted {k['p_corrupted']:.3f} best windows {k['best_windows']}")
        print(" ".join(f"{i}:{e:+.3f}±{se:.3f}" for i, (e, se) in enumerate(zip(k["effect"], k["se"]))))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
