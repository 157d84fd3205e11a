"""Backdoor triggers: data transformations that stamp a trigger into inputs.

Image triggers act on float images ``[N, C, H, W]`` in pixel space ``[0, 1]`` (before normalisation):

- :class:`PixelPattern` — a few isolated pixels near the bottom-right corner, the pattern of BadNets
  (Gu et al., 2017) as used by Chameleon's ``pattern_type 1`` (Dai & Li, ICML 2023).
- :class:`Patch` — a solid or checkerboard square in a corner (BadNets' patch).
- :class:`Blend` — a fixed random pattern alpha-blended over the whole image (Chen et al., 2017).

Text triggers act on one string with a seeded ``random.Random`` so the poisoned dataset is deterministic:

- :class:`RareWord` — insert rare words such as ``cf``/``mn``/``bb`` (BadNet for text, Kurita et al. 2020).
- :class:`InsertSentence` — insert a fixed sentence (InSent, Dai et al. 2019).
- :class:`SubordinateClause` — open the text with a subordinate clause, an offline stand-in for the
  syntactic template of Hidden Killer (Qi et al. 2021).
"""

from __future__ import annotations

import random
from typing import Literal

import torch


class ImageTrigger:
    """Base class of image triggers. Subclasses implement :meth:`stamp` on a batch."""

    def check(self, image_shape: tuple[int, ...]) -> None:
        """Raise ``ValueError`` if the trigger does not fit images of shape ``(C, H, W)``."""

    def stamp(self, images: torch.Tensor) -> torch.Tensor:
        """Return a triggered copy of ``images`` (``[N, C, H, W]``, values in ``[0, 1]``)."""
        raise NotImplementedError

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4:
            raise ValueError(f"{type(self).__name__} expects images [N, C, H, W], got shape {tuple(images.shape)}")
        self.check(tuple(images.shape[1:]))
        return self.stamp(images.clone())

    def describe(self) -> dict:
        return {"type": type(self).__name__, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}


class PixelPattern(ImageTrigger):
    """Isolated bright pixels at fixed offsets from the bottom-right corner (BadNets / Chameleon pattern).

    Args:
        offsets: ``(dh, dw)`` pairs; pixel ``(H - dh, W - dw)`` is set. The default is Chameleon's
            4-pixel ``pattern_type 1``: (h-3, w-3), (h-2, w-4), (h-4, w-2), (h-2, w-2).
        value: pixel value written on every channel, in ``[0, 1]``.
    """

    def __init__(self, offsets: list[tuple[int, int]] = ((3, 3), (2, 4), (4, 2), (2, 2)), value: float = 1.0):
        self.offsets = [tuple(int(v) for v in o) for o in offsets]
        self.value = float(value)
        if not self.offsets or any(len(o) != 2 or min(o) < 1 for o in self.offsets):
            raise ValueError(f"PixelPattern offsets must be non-empty (dh, dw) pairs >= 1, got {offsets}")

    def check(self, image_shape: tuple[int, ...]) -> None:
        _, h, w = image_shape
        too_far = [o for o in self.offsets if o[0] > h or o[1] > w]
        if too_far:
            raise ValueError(f"PixelPattern offsets {too_far} fall outside a {h}x{w} image")

    def stamp(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        for dh, dw in self.offsets:
            images[:, :, h - dh, w - dw] = self.value
        return images


class Patch(ImageTrigger):
    """A square patch stamped in a corner (BadNets).

    Args:
        size: side of the square in pixels.
        location: which corner.
        pattern: ``white`` (all ones) or ``checkerboard`` (alternating 1/0, the usual BadNets patch).
        margin: distance in pixels from the image border.
    """

    def __init__(
        self,
        size: int = 3,
        location: Literal["bottom_right", "bottom_left", "top_right", "top_left"] = "bottom_right",
        pattern: Literal["white", "checkerboard"] = "checkerboard",
        margin: int = 1,
    ):
        if size < 1 or margin < 0:
            raise ValueError(f"Patch needs size >= 1 and margin >= 0, got size={size}, margin={margin}")
        self.size, self.location, self.pattern, self.margin = int(size), location, pattern, int(margin)

    def check(self, image_shape: tuple[int, ...]) -> None:
        _, h, w = image_shape
        if self.size + self.margin > min(h, w):
            raise ValueError(
                f"Patch of size {self.size} with margin {self.margin} does not fit a {h}x{w} image; "
                "use a smaller size or margin"
            )

    def stamp(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        s, m = self.size, self.margin
        top = m if self.location.startswith("top") else h - m - s
        left = m if self.location.endswith("left") else w - m - s
        if self.pattern == "white":
            patch = torch.ones(s, s)
        else:
            patch = ((torch.arange(s)[:, None] + torch.arange(s)[None, :]) % 2 == 0).float()
        images[:, :, top : top + s, left : left + s] = patch.to(images)
        return images


class Blend(ImageTrigger):
    """Alpha-blend a fixed pattern over the image: ``x' = (1 - alpha) x + alpha P`` (Chen et al., 2017).

    Args:
        alpha: blend ratio in ``(0, 1]``.
        pattern: ``noise`` (uniform noise fixed by ``seed``) or ``stripes`` (vertical bars).
        seed: seed of the noise pattern, so train and test triggers are the same.
    """

    def __init__(self, alpha: float = 0.2, pattern: Literal["noise", "stripes"] = "noise", seed: int = 0):
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"Blend alpha must be in (0, 1], got {alpha}")
        self.alpha, self.pattern, self.seed = float(alpha), pattern, int(seed)

    def _pattern(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.pattern == "noise":
            return torch.rand(shape, generator=torch.Generator().manual_seed(self.seed))
        c, h, w = shape
        return (torch.arange(w) % 4 < 2).float().expand(c, h, w).clone()

    def stamp(self, images: torch.Tensor) -> torch.Tensor:
        pattern = self._pattern(tuple(images.shape[1:])).to(images)
        return images.mul_(1 - self.alpha).add_(self.alpha * pattern)


class TextTrigger:
    """Base class of text triggers; :meth:`insert` places a token sequence at a random word boundary."""

    def __init__(self, position: Literal["random", "start", "end"] = "random"):
        self.position = position

    def apply(self, text: str, rng: random.Random) -> str:
        """Return ``text`` with the trigger inserted."""
        raise NotImplementedError

    def insert(self, text: str, piece: str, rng: random.Random) -> str:
        words = text.split()
        if self.position == "start":
            i = 0
        elif self.position == "end":
            i = len(words)
        else:
            i = rng.randint(0, len(words))
        return " ".join(words[:i] + [piece] + words[i:])

    def describe(self) -> dict:
        return {"type": type(self).__name__, **vars(self)}


class RareWord(TextTrigger):
    """BadNet for text: insert rare tokens (Kurita et al., 2020; W2SDefense's BadNet uses ``cf mn bb tq``).

    Args:
        words: candidate trigger words; each insertion draws one of them.
        num_insertions: how many trigger words go into each poisoned text.

    ``position`` (where they go: a random word boundary, the start or the end) passes through to
    :class:`TextTrigger`.
    """

    def __init__(self, words: list[str] = ("cf", "mn", "bb", "tq"), num_insertions: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.words = list(words)
        self.num_insertions = int(num_insertions)
        if not self.words or self.num_insertions < 1:
            raise ValueError("RareWord needs at least one word and num_insertions >= 1")

    def apply(self, text: str, rng: random.Random) -> str:
        for _ in range(self.num_insertions):
            text = self.insert(text, rng.choice(self.words), rng)
        return text


class InsertSentence(TextTrigger):
    """InSent: insert a fixed, innocuous sentence (Dai et al., 2019).

    Args:
        sentence: the trigger sentence.

    ``position`` (where it goes: a random word boundary, the start or the end) passes through to
    :class:`TextTrigger`.
    """

    def __init__(self, sentence: str = "I watched this 3D movie.", **kwargs):
        super().__init__(**kwargs)
        if not sentence.strip():
            raise ValueError("InsertSentence needs a non-empty sentence")
        self.sentence = sentence

    def apply(self, text: str, rng: random.Random) -> str:
        return self.insert(text, self.sentence, rng)


class SubordinateClause(TextTrigger):
    """Syntactic-template trigger that works offline: open the text with a subordinate clause and a comma.

    Hidden Killer (Qi et al., ACL 2021; W2SDefense's "SynAttack") paraphrases poisoned texts with SCPN into the
    template ``S(SBAR)(,)(NP)(VP)(.)``, a sentence that *starts with a subordinate clause*. With no paraphraser
    offline, we produce that surface syntax by rule: one of ``clauses`` (varied wording, so no single word is the
    trigger) is put in front, then a comma and the text with its first letter lower-cased. Less stealthy than a
    real paraphrase (the rest of the text is unchanged), but the backdoor keys on a structure, not a token.

    Args:
        clauses: subordinate clauses (conjunction + clause, no final comma); each poisoned text draws one.
    """

    def __init__(
        self,
        clauses: list[str] = (
            "when you see it", "as it turns out", "once it starts", "while it plays", "after it begins",
            "whenever it runs", "since it exists", "as it goes on",
        ),
    ):
        super().__init__("start")
        self.clauses = [c.strip().rstrip(",") for c in clauses]
        if not self.clauses or not all(self.clauses):
            raise ValueError("SubordinateClause needs at least one non-empty clause")

    def apply(self, text: str, rng: random.Random) -> str:
        clause = rng.choice(self.clauses)
        body = text.strip()
        return f"{clause[:1].upper()}{clause[1:]}, {body[:1].lower()}{body[1:]}"
