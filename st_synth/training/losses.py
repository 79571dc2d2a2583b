"""Losses beyond sentence-transformers' own, for data where in-batch negatives are false negatives."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.losses.gradcache import CachedLossMixin
from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)
from torch import Tensor, nn

from st_synth.common.names import unknown_name
from st_synth.common.taxonomy import kinds_where

_CITATION = (
    "@article{wang2023improving,\n  title={Improving Text Embeddings with Large Language Models},\n"
    "  author={Wang, Liang and Yang, Nan and Huang, Xiaolong and Yang, Linjun and Majumder, Rangan and "
    "Wei, Furu},\n  journal={arXiv preprint arXiv:2401.00368},\n  year={2023}\n}"
)


def own_negatives_loss(embeddings: list[Tensor], scale: float) -> Tensor:
    """InfoNCE of each anchor (``embeddings[0]``) over its own positive (``embeddings[1]``) and own hard
    negatives (the rest), as one batched product: row ``i`` is scored against row ``i`` of each column only."""
    if len(embeddings) < 3:
        raise ValueError(
            "The own-negatives loss needs (anchor, positive, negative) columns; data without hard negatives "
            "needs in-batch negatives (the 'in_batch' loss)."
        )
    anchors = nn.functional.normalize(embeddings[0], dim=-1)  # (batch, dim)
    candidates = nn.functional.normalize(torch.stack(embeddings[1:], dim=1), dim=-1)  # (batch, 1 + n, dim)
    scores = torch.einsum("bd,bkd->bk", anchors, candidates)  # cosine similarities, (batch, 1 + n)
    target = torch.zeros(scores.size(0), dtype=torch.long, device=scores.device)
    return nn.functional.cross_entropy(scores * scale, target)


class OwnNegativesLoss(nn.Module):
    """InfoNCE over each anchor's own positive and own hard negatives only: no in-batch negatives.

    For classification-style data (text, label, misleading label), other rows' labels in the batch are
    often the anchor's own label, so counting them as negatives teaches the model the wrong thing. This
    loss ranks the positive above the row's own negatives and ignores the rest of the batch.

    Args:
        model: The SentenceTransformer being trained.
        scale: Inverse temperature; the paper's temperature 0.02 is ``scale=50``.

    Requirements:
        (anchor, positive, negative_1, ..., negative_n) tuples with at least one negative.

    Inputs:
        +---------------------------------------+--------+
        | Texts                                 | Labels |
        +=======================================+========+
        | (anchor, positive, negative) triplets | none   |
        +---------------------------------------+--------+

    Example::

        from st_synth.training.losses import OwnNegativesLoss
        loss = OwnNegativesLoss(model, scale=50.0)
    """

    def __init__(self, model: SentenceTransformer, scale: float = 50.0) -> None:
        super().__init__()
        self.model = model
        self.scale = scale

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        """The loss of one batch: each query against its positive, every other positive and its own negative."""
        embeddings = [self.model(features)["sentence_embedding"] for features in sentence_features]
        return own_negatives_loss(embeddings, self.scale)

    def get_config_dict(self) -> dict[str, float]:
        return {"scale": self.scale}

    @property
    def citation(self) -> str:
        """The paper this loss follows (the model card cites it)."""
        return _CITATION


class CachedOwnNegativesLoss(CachedLossMixin, nn.Module):
    """:class:`OwnNegativesLoss` with GradCache (sentence-transformers' ``CachedLossMixin``): the texts are
    embedded in mini-batches of ``mini_batch_size`` without activations kept, the loss is computed over the
    whole batch, then each mini-batch is embedded again with gradients and back-propagated with its cached
    embedding gradients. Same loss and gradients as the plain loss; the activations held at once are those
    of one mini-batch, so a 7B backbone can take classification batches as large as the other kinds'.

    Args:
        model: The SentenceTransformer being trained.
        scale: Inverse temperature; the paper's temperature 0.02 is ``scale=50``.
        mini_batch_size: Texts embedded at once.
        show_progress_bar: A progress bar over the mini-batches.
    """

    def __init__(self, model: SentenceTransformer, scale: float = 50.0, mini_batch_size: int = 32,
                 show_progress_bar: bool = False) -> None:  # fmt: skip
        super().__init__()
        if mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be at least 1, got {mini_batch_size}")
        self.model = model
        self.scale = scale
        self.mini_batch_size = mini_batch_size
        self.show_progress_bar = show_progress_bar

    def calculate_loss(
        self, reps: list[list[Tensor]], labels: Tensor | None = None, *, with_backward: bool = False
    ) -> Tensor:
        loss = own_negatives_loss([torch.cat(column) for column in reps], self.scale)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        """The same loss as :class:`OwnNegativesLoss`, its embeddings computed in mini-batches (GradCache)."""
        sentence_features = list(sentence_features)
        if len(sentence_features) < 3:
            own_negatives_loss([], self.scale)  # raises the message naming the columns it needs
        return self.forward_cached(sentence_features, labels)

    def get_config_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "mini_batch_size": self.mini_batch_size}

    @property
    def citation(self) -> str:
        """The paper this loss follows (the model card cites it)."""
        return _CITATION


# The in_batch loss's options, as sentence-transformers' MultipleNegativesRankingLoss names them.
DIRECTIONS = ("query_to_doc", "doc_to_query", "query_to_query", "doc_to_doc")
PARTITION_MODES = ("joint", "per_direction")
HARDNESS_MODES = ("none", "in_batch_negatives", "hard_negatives", "all_negatives")  # none: off


@dataclass(frozen=True)
class LossSpec:
    """A loss of the registry: its plain and GradCache classes and what it compares each anchor with."""

    plain: type[nn.Module]
    cached: type[nn.Module]
    in_batch_negatives: bool
    description: str


LOSSES: dict[str, LossSpec] = {
    "in_batch": LossSpec(
        MultipleNegativesRankingLoss, CachedMultipleNegativesRankingLoss, True,
        "InfoNCE over every positive and hard negative of the batch (gathered across processes): the paper's",
    ),
    "own_negatives": LossSpec(
        OwnNegativesLoss, CachedOwnNegativesLoss, False,
        "InfoNCE over the row's own positive and hard negatives only: for data whose rows share positives "
        "(classification labels)",
    ),
}  # fmt: skip


@dataclass
class LossArguments:
    """The contrastive loss: which one each training source gets, and its settings."""

    loss: str = field(
        default="in_batch",
        metadata={"help": "The loss of every source not named in no_in_batch_negatives: "
                  + "; ".join(f"{name}: {spec.description}" for name, spec in LOSSES.items()) + ".",
                  "choices": list(LOSSES)},
    )  # fmt: skip
    no_in_batch_negatives: list[str] = field(
        default_factory=lambda: kinds_where("in_batch_negatives", False),
        metadata={"help": "Sources trained with the own_negatives loss, because other rows' positives are not "
                  "negatives for them (labels repeat). Default: the kinds that say so (classification)."},
    )  # fmt: skip
    temperature: float = field(
        default=0.02, metadata={"help": "InfoNCE temperature (scale = 1/temperature)."}
    )
    cached_loss: bool = field(
        default=False,
        metadata={"help": "GradCache for every loss: batches of any size at the activation memory of "
                  "mini_batch_size texts."},
    )  # fmt: skip
    mini_batch_size: int = field(default=32, metadata={"help": "Texts embedded at once by the cached loss."})
    gather_across_devices: bool = field(
        default=True, metadata={"help": "In-batch negatives from every process (in_batch loss)."}
    )
    directions: list[str] = field(
        default_factory=lambda: ["query_to_doc"],
        metadata={"help": "What the in_batch loss contrasts (sentence-transformers' MultipleNegativesRankingLoss): "
                  "query_to_doc (each query against every document of the batch; always), doc_to_query (each "
                  "positive against every query: symmetric InfoNCE), query_to_query and doc_to_doc (each against "
                  "the other queries / documents: GTE's improved contrastive loss). Choose from: "
                  + ", ".join(DIRECTIONS) + "."},
    )  # fmt: skip
    partition_mode: str = field(
        default="joint",
        metadata={"help": "How the in_batch loss normalises its directions: joint (one softmax over all of them) or "
                  "per_direction (one each, averaged; only with query_to_doc and doc_to_query).",
                  "choices": list(PARTITION_MODES)},
    )  # fmt: skip
    hardness_mode: str = field(
        default="none",
        metadata={"help": "Weight the in_batch loss's harder negatives up (each negative logit + hardness_strength x "
                  "its similarity, no gradient through it): in_batch_negatives (Lan et al. 2025), hard_negatives "
                  "(the rows' own negatives only, EmbeddingGemma), all_negatives; none: off.",
                  "choices": list(HARDNESS_MODES)},
    )  # fmt: skip
    hardness_strength: float = field(
        default=0.0, metadata={"help": "The hardness weighting's alpha (Lan et al.: 9; EmbeddingGemma: 5)."}
    )
    matryoshka_dims: list[int] = field(
        default_factory=list,
        metadata={"help": "Also train the embeddings cut to these sizes (sentence-transformers' MatryoshkaLoss around "
                  "every source's loss, cached ones included), e.g. 4096 1024 256 64; give the full size too. "
                  "Then `encode(..., truncate_dim=D)` or `st-synth evaluate --truncate_dim D` use a cut model."},
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise unknown_name("loss", self.loss, LOSSES)
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be at least 1, got {self.mini_batch_size}")
        self.directions = list(dict.fromkeys(self.directions))
        wrong = [d for d in self.directions if d not in DIRECTIONS]
        if wrong or "query_to_doc" not in self.directions:
            raise ValueError(f"directions must include query_to_doc and be among {', '.join(DIRECTIONS)}; got "
                             f"{self.directions}")  # fmt: skip
        if self.partition_mode not in PARTITION_MODES:
            raise unknown_name("partition_mode", self.partition_mode, PARTITION_MODES)
        if self.partition_mode == "per_direction" and {"query_to_query", "doc_to_doc"} & set(self.directions):
            raise ValueError("partition_mode per_direction takes only query_to_doc and doc_to_query (a same-type "
                             f"direction has no positive to normalise against); got directions {self.directions}: "
                             "use partition_mode joint")  # fmt: skip
        if self.hardness_mode not in HARDNESS_MODES:
            raise unknown_name("hardness_mode", self.hardness_mode, HARDNESS_MODES)
        if self.hardness_strength < 0:
            raise ValueError(f"hardness_strength must not be negative, got {self.hardness_strength}")
        if self.hardness_mode != "none" and not self.hardness_strength:
            raise ValueError(f"hardness_mode {self.hardness_mode} needs a positive hardness_strength (Lan et al.: "
                             "9, EmbeddingGemma: 5)")  # fmt: skip
        if any(not isinstance(d, int) or d < 1 for d in self.matryoshka_dims):
            raise ValueError(f"matryoshka_dims must be positive integers, got {self.matryoshka_dims}")
        self.matryoshka_dims = sorted(set(self.matryoshka_dims), reverse=True)

    def loss_name(self, source: str) -> str:
        return "own_negatives" if source in self.no_in_batch_negatives else self.loss


def build_loss(name: str, model: SentenceTransformer, settings: LossArguments) -> nn.Module:
    """The registry's loss ``name`` for ``model`` with ``settings`` (its GradCache class when cached_loss)."""
    if name not in LOSSES:
        raise unknown_name("loss", name, LOSSES)
    spec = LOSSES[name]
    kwargs: dict[str, Any] = {"scale": 1.0 / settings.temperature}
    if spec.in_batch_negatives:
        kwargs["gather_across_devices"] = settings.gather_across_devices
        kwargs["directions"] = tuple(settings.directions)
        kwargs["partition_mode"] = settings.partition_mode
        if settings.hardness_mode != "none":
            kwargs["hardness_mode"] = settings.hardness_mode
            kwargs["hardness_strength"] = settings.hardness_strength
    loss = (spec.cached(model, mini_batch_size=settings.mini_batch_size, **kwargs) if settings.cached_loss
            else spec.plain(model, **kwargs))  # fmt: skip
    if settings.matryoshka_dims:
        from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss

        dimension = model.get_embedding_dimension()
        if dimension and max(settings.matryoshka_dims) > dimension:
            raise ValueError(
                f"matryoshka_dims {settings.matryoshka_dims} go beyond the model's {dimension} dimensions."
            )
        return MatryoshkaLoss(model, loss, settings.matryoshka_dims)
    return loss


def loss_citations(losses: dict[str, nn.Module]) -> dict[str, str]:
    """Each loss class trained, by name, with its own ``citation`` (sentence-transformers' losses carry their
    BibTeX; a wrapper such as ``MatryoshkaLoss`` and the loss inside it are both named), in training order.

    Example::

        >>> loss_citations({"sts": MultipleNegativesRankingLoss(model)})
        {'MultipleNegativesRankingLoss': '@misc{henderson2017efficient, ...}'}
    """
    found: dict[str, str] = {}
    for loss in losses.values():
        for part in (loss, getattr(loss, "loss", None)):
            if isinstance(part, nn.Module):
                found.setdefault(type(part).__name__, (getattr(part, "citation", None) or "").strip())
    return found
