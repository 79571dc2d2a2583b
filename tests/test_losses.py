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


GTE = ["query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"]


def test_the_in_batch_loss_takes_directions_and_hardness_weighting(model):
    """The in_batch loss's options reach sentence-transformers' loss (plain and cached alike, the same values and
    gradients), change what it computes, and bad values are refused naming the choices."""
    features = _features(model, 13)
    settings = dict(gather_across_devices=False, directions=GTE, hardness_mode="in_batch_negatives",
                    hardness_strength=9.0)  # fmt: skip
    plain = build_loss("in_batch", model, LossArguments(**settings))
    cached = build_loss("in_batch", model, LossArguments(cached_loss=True, mini_batch_size=4, **settings))
    for loss in (plain, cached):
        assert loss.directions == tuple(GTE) and loss.partition_mode == "joint"
        assert loss.hardness_mode == "in_batch_negatives" and loss.hardness_strength == 9.0
    plain_value, plain_grads = _loss_and_grads(plain, model, features)
    cached_value, cached_grads = _loss_and_grads(cached, model, features)
    torch.testing.assert_close(cached_value, plain_value, rtol=1e-5, atol=1e-6)
    for key, grad in plain_grads.items():
        torch.testing.assert_close(cached_grads[key], grad, rtol=1e-4, atol=1e-6)
    # Each option changes the loss: more terms in the softmax's denominator, harder negatives weighted up.
    default, _ = _loss_and_grads(build_loss("in_batch", model, LossArguments(gather_across_devices=False)),
                                 model, features)  # fmt: skip
    gte, _ = _loss_and_grads(build_loss("in_batch", model, LossArguments(gather_across_devices=False,
                                                                          directions=GTE)), model, features)  # fmt: skip
    symmetric = build_loss("in_batch", model, LossArguments(gather_across_devices=False, partition_mode="per_direction",
                                                            directions=["query_to_doc", "doc_to_query"]))  # fmt: skip
    assert symmetric.partition_mode == "per_direction"
    assert gte > default and plain_value > gte
    assert _loss_and_grads(symmetric, model, features)[0] != default
    # Duplicates are dropped; the own-negatives loss (classification) takes none of these options.
    assert LossArguments(directions=["query_to_doc", "query_to_doc"]).directions == ["query_to_doc"]
    assert type(build_loss("own_negatives", model, LossArguments(**settings))) is OwnNegativesLoss
    refused = {
        r"directions must include query_to_doc and be among query_to_doc, doc_to_query, query_to_query, "
        r"doc_to_doc; got \['doc_to_query'\]": dict(directions=["doc_to_query"]),
        r"directions must include .*; got \['query_to_doc', 'doc_to_docs'\]": dict(
            directions=["query_to_doc", "doc_to_docs"]
        ),
        r"Unknown partition_mode 'both'\. Choose one of: joint, per_direction\.": dict(partition_mode="both"),
        r"per_direction takes only query_to_doc and doc_to_query .* use partition_mode joint": dict(
            partition_mode="per_direction", directions=GTE
        ),
        r"Unknown hardness_mode 'in_batch'\. Did you mean 'in_batch_negatives'\? Choose one of: none, "
        r"in_batch_negatives, hard_negatives, all_negatives\.": dict(hardness_mode="in_batch"),
        r"hardness_mode hard_negatives needs a positive hardness_strength": dict(
            hardness_mode="hard_negatives"
        ),
        r"hardness_strength must not be negative, got -1": dict(hardness_strength=-1.0),
    }
    for message, wrong in refused.items():
        with pytest.raises(ValueError, match=message):
            LossArguments(**wrong)
