"""Stand-ins for what a cluster config names but a machine may lack, for :mod:`recipes.gpu_check`.

A GPU check must run the real architecture on real shapes even where the gated hub weights or the exported data are
absent. This module writes, into a scratch directory:

* a model directory per hub backbone: ``config.json`` of the real architecture (built with the ``transformers`` config
  class and the sizes of the hub checkpoint's ``config.json``; ``layers`` cuts the depth) and a word-level tokenizer
  (``w0 ... w3999``, the answer letters, the trigger word, the model family's special tokens), so a config's
  ``pretrained``/``tokenizer`` can point at it with ``random_init: true``;
* synthetic data in the formats the DataModules read (text store, WMDP domain store, CounterFact JSON and a statistics
  corpus, CIFAR-10 binary batches, image stores) whose texts are at least ``max_length`` tokens long, so every batch
  has the configured (worst-case) shape;
* a CLIP merge pool: a random tower as ``theta_0`` and task models at small random offsets, saved as artifacts.

None of it is a model or data set anyone should train on: it exists so the throughput, memory, device and precision
of a config can be measured before the real assets are there.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

WORDS = 4000  # word-level vocabulary of the stand-in tokenizers: w0 ... w3999
EXTRA_WORDS = ["A", "B", "C", "D", "Answer:", "mn", "cf", "bb", "the", "is", "of", "a", "."]

# The sizes of the hub checkpoints' config.json (meta-llama/Meta-Llama-3-8B[-Instruct], meta-llama/Llama-2-7b-hf,
# bert-base-uncased, openai/clip-vit-base-patch32's vision tower).
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "llama3-8b": ("llama", {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                            "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                            "tie_word_embeddings": False}),  # fmt: skip
    "llama2-7b": ("llama", {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                            "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
                            "tie_word_embeddings": False}),  # fmt: skip
    "bert-base": ("bert", {"vocab_size": 30522, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                           "num_attention_heads": 12, "max_position_embeddings": 512, "type_vocab_size": 2}),
    "clip-vit-b32": ("clip_vision_model", {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                                           "num_attention_heads": 12, "image_size": 224, "patch_size": 32,
                                           "projection_dim": 512}),  # fmt: skip
}
HUB_ARCHITECTURES = {
    "meta-llama/Meta-Llama-3-8B": "llama3-8b",
    "meta-llama/Meta-Llama-3-8B-Instruct": "llama3-8b",
    "meta-llama/Llama-2-7b-hf": "llama2-7b",
    "bert-base-uncased": "bert-base",
    "google-bert/bert-base-uncased": "bert-base",
    "openai/clip-vit-base-patch32": "clip-vit-b32",
}
SPECIALS = {  # family -> (special tokens, bos prepended, eos appended, pad token or None: the code pads with eos)
    "llama3-8b": (["<|begin_of_text|>", "<|end_of_text|>", "<unk>"], "<|begin_of_text|>", None, None),
    "llama2-7b": (["<s>", "</s>", "<unk>"], "<s>", None, None),
    "bert-base": (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], "[CLS]", "[SEP]", "[PAD]"),
}


def architecture(kind: str, layers: int | None = None, **overrides) -> dict:
    """The config fields of ``kind`` (a key of :data:`ARCHITECTURES`), depth cut to ``layers`` if given."""
    if kind not in ARCHITECTURES:
        raise ValueError(f"no stand-in architecture {kind!r}; choose one of {sorted(ARCHITECTURES)}")
    fields = dict(ARCHITECTURES[kind][1])
    if layers is not None:
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        fields["num_hidden_layers"] = min(layers, fields["num_hidden_layers"])
    return {**fields, **overrides}


def _tokenizer(kind: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials, bos, eos, pad = SPECIALS[kind]
    unk = "[UNK]" if "[UNK]" in specials else "<unk>"
    vocab = {tok: i for i, tok in enumerate([*specials, *EXTRA_WORDS, *(f"w{i}" for i in range(WORDS))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    single = " ".join(t for t in (bos, "$A", eos) if t)
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[(t, vocab[t]) for t in (bos, eos)
                                                                                      if t])  # fmt: skip
    named = {"unk_token": unk, "bos_token": bos}
    if kind == "bert-base":
        named.update(cls_token="[CLS]", sep_token="[SEP]", pad_token=pad, mask_token="[MASK]")
    else:
        named.update(eos_token=specials[1])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **named), vocab


def write_model_dir(directory: str | Path, kind: str, layers: int | None = None, **overrides) -> Path:
    """``config.json`` of the real architecture of ``kind`` and a stand-in tokenizer (no weights: load it with
    ``random_init: true``). Rewritten on every call (a different ``layers`` changes it)."""
    from transformers import AutoConfig

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_type = ARCHITECTURES[kind][0] if kind in ARCHITECTURES else None
    fields = architecture(kind, layers, **overrides)
    if kind in SPECIALS:
        tokenizer, vocab = _tokenizer(kind)
        tokenizer.save_pretrained(directory)
        specials, bos, _, pad = SPECIALS[kind]
        fields.update(bos_token_id=vocab[bos], eos_token_id=vocab[specials[1]])
        if pad is not None:
            fields["pad_token_id"] = vocab[pad]
    AutoConfig.for_model(model_type, **fields).save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------------------------------- data
def words(rng: random.Random, n: int) -> str:
    """``n`` stand-in words (one token each under the stand-in tokenizers, more under a real one)."""
    return " ".join(f"w{rng.randrange(WORDS)}" for _ in range(n))


def write_text_classification(directory: str | Path, sizes: dict[str, int], length: int, seed: int = 0) -> Path:
    """A text store (the SST-2 export's format) with ``sizes[split]`` rows of ``length`` words, labels alternating."""
    from foundation.text_store import write_text_store

    rng = random.Random(seed)
    splits = {s: [(words(rng, length), i % 2) for i in range(n)] for s, n in sizes.items()}
    return write_text_store(directory, splits, ["negative", "positive"], source="synthetic:gpu_check")


def write_domain(directory: str | Path, texts: int, questions: int, length: int, seed: int = 0) -> Path:
    """A WMDP domain store (``foundation.export_wmdp``'s format): ``texts`` forget and retain texts of ``length`` words,
    ``questions`` 4-choice questions per side."""
    from foundation.wmdp_store import write_domain_store

    rng = random.Random(seed)

    def qs():
        return [{"question": words(rng, 24), "choices": [words(rng, 4) for _ in range(4)], "answer": i % 4,
                 "subject": "synthetic"} for i in range(questions)]  # fmt: skip

    return write_domain_store(
        directory,
        {side: [(words(rng, length), "synthetic") for _ in range(texts)] for side in ("forget", "retain")},
        {"forget_questions": qs(), "retain_questions": qs()},
        sources={"forget": [{"hub_id": "synthetic:gpu_check"}]},
    )


def write_counterfact(path: str | Path, n: int, seed: int = 0) -> Path:
    """``n`` CounterFact records (ROME/MEMIT's ``multi_counterfact.json`` fields) of stand-in words, 2 paraphrase
    and 10 neighbourhood prompts each (CounterFact's counts)."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        subject = words(rng, 2)
        records.append({
            "case_id": i,
            "requested_rewrite": {"prompt": "{} " + words(rng, 4), "relation_id": "P0", "subject": subject,
                                  "target_new": {"str": words(rng, 1), "id": "Q1"},
                                  "target_true": {"str": words(rng, 1), "id": "Q2"}},
            "paraphrase_prompts": [words(rng, 8) + " " + subject + " " + words(rng, 3) for _ in range(2)],
            "neighborhood_prompts": [words(rng, 6) for _ in range(10)],
            "attribute_prompts": [], "generation_prompts": [subject + " " + words(rng, 2)],
        })  # fmt: skip
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path


def write_corpus(path: str | Path, lines: int, length: int, seed: int = 0) -> Path:
    """A statistics corpus: ``lines`` texts of ``length`` words, one per line."""
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(words(rng, length) for _ in range(lines)) + "\n")
    return path


def write_cifar10(cache: str | Path, per_batch: int, test: int, seed: int = 0) -> Path:
    """CIFAR-10 binary batches (``data_batch_1..5.bin`` of ``per_batch`` records, ``test_batch.bin``) under
    ``cache/cifar10/cifar-10-batches-bin``, the layout :func:`foundation.assets.cifar10_files` reads with
    ``SAFEWEIGHTS_CACHE=cache``."""
    directory = Path(cache) / "cifar10" / "cifar-10-batches-bin"
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for name in names:
        n = test if name.startswith("test") else per_batch
        records = rng.integers(0, 256, (n, 3073), dtype=np.uint8)
        records[:, 0] = np.arange(n) % 10
        (directory / name).write_bytes(records.tobytes())
    return directory


def write_images(directory: str | Path, train: int, test: int, image_size: int, classes: int = 10,
                 seed: int = 0) -> Path:  # fmt: skip
    """An image store (``foundation.export_images``' format) of random RGB images already at ``image_size``."""
    from foundation.image_store import write_image_store

    rng = np.random.default_rng(seed)

    def images(n):
        return (rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8) for _ in range(n))

    splits = {"train": (images(train), [i % classes for i in range(train)], train),
              "test": (images(test), [i % classes for i in range(test)], test)}  # fmt: skip
    return write_image_store(directory, splits, [f"class{i}" for i in range(classes)], image_size,
                             source="synthetic:gpu_check")  # fmt: skip


def write_clip_pool(directory: str | Path, vision_config: dict, tasks: int, num_classes: int = 10,
                    scale: float = 1e-3, seed: int = 0) -> tuple[Path, list[Path]]:  # fmt: skip
    """A random CLIP tower saved as ``theta_0`` (``directory/pretrained``) and ``tasks`` task models at Gaussian
    offsets of std ``scale`` (``directory/task<k>``), as ``TaskFineTuning`` artifacts (``net.*`` keys). Returns the
    artifact paths."""
    from lightning_modules.nets.clip import CLIPImageClassifier
    from foundation.artifacts import save_artifact

    directory = Path(directory)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = CLIPImageClassifier(num_classes, model_name_or_path=None, vision_config=vision_config)
        net.build()
        state = {f"net.{k}": v.detach().clone() for k, v in net.state_dict().items()}
        manifest = {"recipe": "recipes.standins.write_clip_pool", "config": {"vision_config": vision_config}}
        pretrained = save_artifact(directory / "pretrained", state, manifest)
        out = []
        for k in range(tasks):
            task = {n: v + scale * torch.randn_like(v) if v.is_floating_point() else v for n, v in state.items()}
            out.append(save_artifact(directory / f"task{k}", task, manifest))
    return pretrained, out
