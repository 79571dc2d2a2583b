"""Losses beyond sentence-transformers' own, for data where in-batch negatives are false negatives."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.util import cos_sim
from torch import Tensor, nn


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

        from st_synth.losses import OwnNegativesLoss
        loss = OwnNegativesLoss(model, scale=50.0)
    """

    def __init__(self, model: SentenceTransformer, scale: float = 50.0) -> None:
        super().__init__()
        self.model = model
        self.scale = scale

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        embeddings = [self.model(features)["sentence_embedding"] for features in sentence_features]
        if len(embeddings) < 3:
            raise ValueError(
                "OwnNegativesLoss needs (anchor, positive, negative) columns; data without hard negatives "
                "needs in-batch negatives (MultipleNegativesRankingLoss)."
            )
        anchors, candidates = embeddings[0], torch.stack(embeddings[1:], dim=1)  # (batch, 1 + negatives, dim)
        scores = torch.stack(
            [cos_sim(anchor[None], options)[0] for anchor, options in zip(anchors, candidates, strict=True)]
        )
        target = torch.zeros(scores.size(0), dtype=torch.long, device=scores.device)
        return nn.functional.cross_entropy(scores * self.scale, target)

    def get_config_dict(self) -> dict[str, float]:
        return {"scale": self.scale}

    @property
    def citation(self) -> str:
        return (
            "@article{wang2023improving,\n  title={Improving Text Embeddings with Large Language Models},\n"
            "  author={Wang, Liang and Yang, Nan and Huang, Xiaolong and Yang, Linjun and Majumder, Rangan and "
            "Wei, Furu},\n  journal={arXiv preprint arXiv:2401.00368},\n  year={2023}\n}"
        )
