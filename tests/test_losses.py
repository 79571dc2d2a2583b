"""The loss registry: the vectorised own-negatives loss, its GradCache variant, and which source gets which."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset, DatasetDict
from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)
from sentence_transformers.util import cos_sim

from st_synth.testing.tiny import build_tiny_mistral
from st_synth.training.arguments import ModelArguments
from st_synth.training.losses import (
    LOSSES,
    CachedOwnNegativesLoss,
    LossArguments,
    OwnNegativesLoss,
    build_loss,
    own_negatives_loss,
)
from st_synth.training.trainer import build_losses, build_model


def test_the_batched_loss_is_the_per_row_loss():
    torch.manual_seed(0)
    columns = [torch.randn(9, 16) for _ in range(4)]  # anchor, positive, two negatives
    rows = []
    for i in range(9):  # each anchor against its own candidates only, one row at a time
        candidates = torch.stack([column[i] for column in columns[1:]])
        rows.append(cos_sim(columns[0][i][None], candidates)[0])
    expected = torch.nn.functional.cross_entropy(torch.stack(rows) * 50.0, torch.zeros(9, dtype=torch.long))
    torch.testing.assert_close(own_negatives_loss(columns, 50.0), expected)
    with pytest.raises(ValueError, match=r"needs \(anchor, positive, negative\) columns"):
        own_negatives_loss(columns[:2], 50.0)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    backbone = build_tiny_mistral(tmp_path_factory.mktemp("tiny") / "m", "none", hidden_size=32)
    return build_model(ModelArguments(base_model=str(backbone), max_seq_length=24, lora_r=4, lora_alpha=8,
                                      lora_dropout=0.0))  # fmt: skip


def _features(model, n: int):
    words = "cat dog bird stock market price rain snow wind ball goal team".split()
    columns = [[" ".join(words[(i * 5 + j * 3 + k) % len(words)] for k in range(2 + (i + j) % 5))
                for i in range(n)] for j in range(3)]  # fmt: skip
    return [model.tokenize(column) for column in columns]


def _loss_and_grads(loss, model, features):
    model.zero_grad()
    value = loss([{k: v.clone() if torch.is_tensor(v) else v for k, v in f.items()} for f in features], None)
    value.backward()
    grads = {
        name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad and p.grad is not None
    }
    return value.detach(), grads


@pytest.mark.parametrize("name", list(LOSSES))
def test_the_cached_loss_has_the_same_loss_and_gradients(model, name):
    features = _features(model, 13)  # not a multiple of the mini batch: a short last one too
    plain = build_loss(name, model, LossArguments(gather_across_devices=False))
    cached = build_loss(
        name, model, LossArguments(cached_loss=True, mini_batch_size=4, gather_across_devices=False)
    )
    assert type(cached) is LOSSES[name].cached and type(plain) is LOSSES[name].plain
    plain_value, plain_grads = _loss_and_grads(plain, model, features)
    cached_value, cached_grads = _loss_and_grads(cached, model, features)
    torch.testing.assert_close(cached_value, plain_value, rtol=1e-5, atol=1e-6)
    assert plain_grads and plain_grads.keys() == cached_grads.keys()
    for key, grad in plain_grads.items():
        torch.testing.assert_close(cached_grads[key], grad, rtol=1e-4, atol=1e-6)


def test_sources_get_their_loss_from_the_registry(model):
    triplets = Dataset.from_dict({"query": ["a"], "positive": ["b"], "negative": ["c"]})
    sources = DatasetDict({"retrieval": triplets, "classification": triplets})
    losses = build_losses(model, sources, LossArguments())
    assert type(losses["retrieval"]) is MultipleNegativesRankingLoss and losses["retrieval"].scale == 50
    assert type(losses["classification"]) is OwnNegativesLoss
    # With GradCache on (the 7B config), classification gets the cached own-negatives loss too.
    losses = build_losses(
        model, sources, LossArguments(cached_loss=True, mini_batch_size=8, temperature=0.05)
    )
    assert type(losses["retrieval"]) is CachedMultipleNegativesRankingLoss
    assert type(losses["classification"]) is CachedOwnNegativesLoss
    assert losses["classification"].mini_batch_size == 8 and losses["classification"].scale == 20
    losses = build_losses(model, sources, LossArguments(loss="own_negatives", no_in_batch_negatives=[]))
    assert all(type(loss) is OwnNegativesLoss for loss in losses.values())
    with pytest.raises(ValueError, match=r"Unknown loss 'mnrl'\. Choose one of: in_batch, own_negatives"):
        LossArguments(loss="mnrl")
