"""Multi-process training keeps every rank on the same source at every step (no hang, no mixed negatives).

The sampler is checked against accelerate's own ``BatchSamplerShard`` (what each rank really receives),
and whole runs go through torchrun on CPU (gloo) over all six kinds with uneven sizes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.data_loader import BatchSamplerShard
from datasets import Dataset
from sentence_transformers.base.sampler import NoDuplicatesBatchSampler
from torch.utils.data import ConcatDataset

from st_synth.common.taxonomy import TASK_KINDS
from st_synth.data.toy import write_toy_synthetic
from st_synth.testing.tiny import build_tiny_mistral
from st_synth.training.sampling import LengthGroupedBatchSampler, SourceAlignedBatchSampler
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
# Uneven on purpose: sources run out at different steps, and some sizes leave a short last global batch.
UNEVEN = {"retrieval": 29, "classification": 13, "short_short": 22, "long_long": 9, "sts": 17, "bitext": 11}


def _sources(sizes: dict[str, int]) -> dict[str, Dataset]:
    return {
        name: Dataset.from_dict({"query": [f"{name} q {i}" for i in range(n)],
                                 "positive": [f"{name} p {i}" for i in range(n)]})
        for name, n in sizes.items()
    }  # fmt: skip


def _aligned(sizes: dict[str, int], per_device: int, world: int, sampler_class, order="proportional", seed=5):
    sources = _sources(sizes)
    concat = ConcatDataset(list(sources.values()))
    generator = torch.Generator()  # shared by the sources' samplers, as the trainer does
    samplers = [
        sampler_class(ds, batch_size=per_device * world, drop_last=False, generator=generator, seed=seed)
        for ds in sources.values()
    ]
    return SourceAlignedBatchSampler(
        concat, samplers, seed=seed, names=list(sources), world_size=world, order=order
    )


def _source_of(index: int, sizes: dict[str, int]) -> str:
    for name, n in sizes.items():
        if index < n:
            return name
        index -= n
    raise IndexError(index)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("sampler_class", [NoDuplicatesBatchSampler, LengthGroupedBatchSampler])
@pytest.mark.parametrize("even_batches", [False, True])
def test_every_rank_gets_its_part_of_the_same_sources_global_batch(world, sampler_class, even_batches):
    sampler = _aligned(UNEVEN, per_device=4, world=world, sampler_class=sampler_class)
    ranks = [
        list(BatchSamplerShard(sampler, num_processes=world, process_index=rank, even_batches=even_batches))
        for rank in range(world)
    ]
    plan = sampler.plan()
    assert all(len(batches) == len(plan) for batches in ranks), "a rank would run more steps than another"
    seen: set[int] = set()
    for step, (source, rows) in enumerate(plan):
        parts = [ranks[rank][step] for rank in range(world)]
        assert all(len(part) == rows > 0 for part in parts)  # one size: gathers line up
        assert {_source_of(i, UNEVEN) for part in parts for i in part} == {source}
        flat = [i for part in parts for i in part]
        assert len(set(flat)) == len(flat) and not seen & set(flat)  # disjoint, each row at most once
        seen |= set(flat)
    # Only a global batch's remainder (fewer rows than ranks) is ever left out.
    lost = sum(UNEVEN.values()) - len(seen)
    assert 0 <= lost < world * len(UNEVEN) * 2
    assert {source for source, _ in plan} == set(UNEVEN)
    assert len(sampler) == world * len(plan)


def test_global_batches_do_not_depend_on_the_number_of_processes():
    """The data of a step is the same with 1, 2 or 3 processes at the same global batch size: what one
    process trains on as a batch of 12, three processes train on as parts of 4 (less a remainder of fewer
    rows than processes, which no rank could gather evenly; and these (query, positive) sources skip a batch
    of fewer than two rows per rank, which contrasts nothing)."""
    single = list(_aligned(UNEVEN, per_device=12, world=1, sampler_class=NoDuplicatesBatchSampler))
    for world in (2, 3):
        sampler = _aligned(
            UNEVEN, per_device=12 // world, world=world, sampler_class=NoDuplicatesBatchSampler
        )
        batches = list(sampler)
        merged = [[i for part in batches[k : k + world] for i in part] for k in range(0, len(batches), world)]
        expected = [batch[: len(batch) // world * world] for batch in single if len(batch) >= 2 * world]
        assert merged == expected


def test_a_batch_that_contrasts_nothing_is_skipped():
    """A one-row batch of a (query, positive) source has an in-batch loss of exactly zero (no gradient, but a
    step of the schedule): it is skipped and counted. A source with its own negatives keeps it (the row still
    contrasts its positive with its negative)."""
    pairs, triplets = _sources({"pairs": 9}), {"triplets": Dataset.from_dict(
        {"query": [f"q {i}" for i in range(9)], "positive": [f"p {i}" for i in range(9)],
         "negative": [f"n {i}" for i in range(9)]})}  # fmt: skip
    sources = {**pairs, **triplets}
    generator = torch.Generator()
    samplers = [NoDuplicatesBatchSampler(ds, batch_size=4, drop_last=False, generator=generator, seed=1)
                for ds in sources.values()]  # fmt: skip
    sampler = SourceAlignedBatchSampler(ConcatDataset(list(sources.values())), samplers, seed=1,
                                        names=list(sources))  # fmt: skip
    plan = sampler.plan()
    assert sorted(rows for source, rows in plan if source == "pairs") == [
        4,
        4,
    ]  # the ninth row's batch skipped
    assert sorted(rows for source, rows in plan if source == "triplets") == [1, 4, 4]
    assert sampler.skipped == {"pairs": 1} and len(list(sampler)) == 5


def test_round_robin_order_and_bad_settings():
    sampler = _aligned({"a": 16, "b": 8}, per_device=2, world=2, sampler_class=NoDuplicatesBatchSampler,
                       order="round_robin")  # fmt: skip
    assert [source for source, _ in sampler.plan()] == ["a", "b", "a", "b"]
    with pytest.raises(ValueError, match="choose one of: proportional, round_robin"):
        _aligned({"a": 4}, per_device=2, world=1, sampler_class=NoDuplicatesBatchSampler, order="random")


def test_all_six_kinds_of_toy_data_have_their_kinds_columns(tmp_path):
    from st_synth.data.examples import load_examples

    folder = write_toy_synthetic(tmp_path / "six", rows_per_kind=UNEVEN, kinds=tuple(UNEVEN))
    data = load_examples(folder)
    for kind, n in UNEVEN.items():
        assert data[kind].num_rows == n
        assert tuple(data[kind].column_names) == TASK_KINDS[kind].columns


# -- real multi-process runs ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return str(build_tiny_mistral(tmp_path_factory.mktemp("backbone") / "tiny", "bos_only", hidden_size=32))


@pytest.fixture(scope="module")
def six_kinds(tmp_path_factory):
    return str(
        write_toy_synthetic(
            tmp_path_factory.mktemp("data") / "six", rows_per_kind=UNEVEN, kinds=tuple(UNEVEN)
        )
    )


def _config(backbone: str, dataset: str, output: Path, **extra) -> dict:
    return {
        "base_model": backbone, "dataset": dataset, "max_seq_length": 32, "lora_r": 4, "lora_alpha": 8,
        "lora_dropout": 0.0, "per_device_train_batch_size": 4, "learning_rate": 5e-3, "num_train_epochs": 1,
        "warmup_steps": 0, "weight_decay": 0.0, "logging_steps": 1, "save_strategy": "no", "use_cpu": True,
        "output_dir": str(output), "seed": 11, "temperature": 0.05, "batch_sampler": "no_duplicates",
        "gradient_checkpointing": False, "ddp_backend": "gloo", "mini_batch_size": 2, **extra,
    }  # fmt: skip


def _launch(processes: int, config: dict, folder: Path, script: Path | None = None, timeout: int = 300,
            home: Path | None = None):  # fmt: skip
    """Run the recipe (or ``script``) under torchrun (with ``home`` as HOME); a hang fails here, at ``timeout``."""
    path = folder / "config.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "ST_SYNTH_TRACE_DIR": str(folder / "trace"), "OMP_NUM_THREADS": "1"}
    if home is not None:
        env["HOME"] = str(home)
    command = [torchrun, "--nproc_per_node", str(processes), "--master_port", str(free_port()),
               str(script or ROOT / "recipes" / "train_mistral.py"), str(path)]  # fmt: skip
    with (folder / "log.txt").open("w") as log:
        try:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{processes} processes did not finish within {timeout} s: a hang")
    return done.returncode, (folder / "log.txt").read_text()


def _steps(trace_dir: Path, rank: int) -> list[tuple[int, str, int]]:
    lines = (trace_dir / f"rank{rank}.jsonl").read_text().splitlines()
    return [(e["step"], e["source"], e["rows"]) for e in map(json.loads, lines) if "step" in e]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("processes", "settings"),
    [
        (2, {"cached_loss": False, "length_grouping": True}),
        (2, {"cached_loss": True, "length_grouping": False, "gradient_accumulation_steps": 2}),
        (3, {"cached_loss": True, "length_grouping": True}),
        (3, {"cached_loss": False, "length_grouping": False}),
    ],
)
def test_ranks_train_on_the_same_source_at_every_step(backbone, six_kinds, tmp_path, processes, settings):
    code, log = _launch(processes, _config(backbone, six_kinds, tmp_path / "run", **settings), tmp_path)
    assert code == 0, log[-4000:]
    steps = [_steps(tmp_path / "trace", rank) for rank in range(processes)]
    assert steps[0], log[-2000:]
    for other in steps[1:]:
        assert [(step, source) for step, source, _ in other] == [
            (step, source) for step, source, _ in steps[0]
        ]
        assert [rows for *_, rows in other] == [rows for *_, rows in steps[0]]
    assert {source for _, source, _ in steps[0]} == set(UNEVEN)
    summary = json.loads((tmp_path / "run" / "training_summary.json").read_text())
    assert summary["world_size"] == processes
    assert sum(summary["steps_per_source"].values()) == len(steps[0])
    assert set(summary["steps_per_source"]) == set(UNEVEN)


@pytest.mark.slow
@pytest.mark.parametrize(("processes", "base_model"), [(3, "tiny"), (2, "smollm2-135m")])
def test_first_use_by_many_processes_on_a_fresh_home(six_kinds, tmp_path, processes, base_model):
    """Every rank asks for the backbone shortcut, which is converted into ~/.cache/st_synth on first use:
    one rank builds it while the others wait, and no rank reads a half-written folder."""
    if base_model == "smollm2-135m":
        pytest.importorskip("gguf", reason="the packaged SmolLM2 needs the [local] extra")
    home = tmp_path / "home"
    config = _config(base_model, six_kinds, str(tmp_path / "run"), max_steps=2)
    code, log = _launch(processes, config, tmp_path, home=home, timeout=600)
    assert code == 0, log[-4000:]
    # "tiny" is built beside the run's output folder, the packaged SmolLM2 in the home's cache.
    cache, folder = {"tiny": (tmp_path, "tiny-mistral"),
                     "smollm2-135m": (home / ".cache" / "st_synth", "smollm2-135m-mistral")}[base_model]  # fmt: skip
    assert sorted(p.name for p in cache.iterdir() if folder in p.name) == [f".{folder}.lock", folder]
    assert (cache / folder / "model.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "training_summary.json").read_text())["world_size"] == processes


GTE_HARDNESS = {"directions": ["query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"],
                "hardness_mode": "in_batch_negatives", "hardness_strength": 9.0}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("loss_settings", [{}, GTE_HARDNESS], ids=["infonce", "gte_hardness"])
def test_two_processes_give_the_losses_of_one_process_over_the_same_global_batches(backbone, tmp_path,
                                                                                   loss_settings):  # fmt: skip
    """Full global batches (sizes that divide by 8; no classification, whose rows may not share a batch
    when they share a label), so that no remainder is cut and both runs see exactly the same rows. With GTE's
    directions and hardness weighting too: the gathered queries and positives count as in one process."""
    even = {"retrieval": 24, "short_short": 16, "sts": 16, "long_long": 8, "bitext": 16}
    dataset = str(write_toy_synthetic(tmp_path / "even", rows_per_kind=even, kinds=tuple(even)))
    base = {"cached_loss": False, "length_grouping": True, "max_steps": 8, **loss_settings}
    code, log = _launch(2, _config(backbone, dataset, tmp_path / "two" / "run", per_device_train_batch_size=4, **base),
                        tmp_path / "two")  # fmt: skip
    assert code == 0, log[-4000:]
    code, log = _launch(1, _config(backbone, dataset, tmp_path / "one" / "run", per_device_train_batch_size=8, **base),
                        tmp_path / "one")  # fmt: skip
    assert code == 0, log[-4000:]

    def losses(folder: Path) -> list[float]:
        summary = json.loads((folder / "run" / "training_summary.json").read_text())
        return [entry["loss"] for entry in summary["log_history"] if "loss" in entry]

    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert len(two) == len(one) == 8
    assert torch.allclose(torch.tensor(two), torch.tensor(one), rtol=1e-4, atol=1e-5), (two, one)
    two_steps, one_steps = _steps(tmp_path / "two" / "trace", 0), _steps(tmp_path / "one" / "trace", 0)
    assert [rows for *_, rows in two_steps] == [4] * 8 and [rows for *_, rows in one_steps] == [8] * 8
    assert [source for _, source, _ in two_steps] == [source for _, source, _ in one_steps]


@pytest.mark.slow
def test_ranks_with_different_data_are_refused_not_left_hanging(backbone, six_kinds, tmp_path):
    """Rank 1 loads fewer rows than rank 0: the plans differ, and both ranks stop with a message."""
    script = tmp_path / "uneven_ranks.py"
    script.write_text(
        "import os, sys\n"
        "from st_synth.training.arguments import make_train_parser\n"
        "from st_synth.training.trainer import train\n"
        f"sys.path.insert(0, {str(ROOT / 'recipes')!r})\n"
        "from train_mistral import yaml_to_flags\n"
        "m, d, l, o, t = make_train_parser().parse_args_into_dataclasses(args=yaml_to_flags(sys.argv[1]))\n"
        "if os.environ['RANK'] == '1':\n"
        "    d.max_examples_per_source = 8\n"
        "train(m, d, t, o, l)\n"
    )
    code, log = _launch(
        2, _config(backbone, six_kinds, tmp_path / "run"), tmp_path, script=script, timeout=240
    )
    assert code != 0
    assert "disagree on the batch plan" in log, log[-3000:]
