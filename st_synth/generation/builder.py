"""Build a synthetic embedding dataset: plan, request, validate, deduplicate, account, save.

Determinism contract: example ``i`` is the first *valid, non-duplicate* answer among its attempts
``0, 1, 2, ...``, and each attempt is a request fixed by ``(seed, i, attempt)``. So the dataset does not
depend on concurrency, on completion order, on faults that were retried, on a restart from the cache, or
on how the examples were split into shards.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import openai
from datasets import DatasetDict
from tqdm.auto import tqdm

from st_synth.common.names import REPORT_FILE
from st_synth.common.taxonomy import TASK_KINDS
from st_synth.data.corpus import Corpus
from st_synth.data.examples import to_saved, write_saved
from st_synth.data.neardup import ExactKeys, NearDuplicateIndex, exact_key, signature
from st_synth.generation import grounding
from st_synth.generation.cache import AnswerCache
from st_synth.generation.client import ChatClient, Deferred, RequestRefused, RetryPolicy, make_clients
from st_synth.generation.config import GenerationConfig
from st_synth.generation.prompting import (
    ChatRequest,
    ExamplePlan,
    brainstorm_request,
    brainstorm_template,
    example_request,
    plan_example,
)
from st_synth.generation.spool import Kept, ShardIndices, Spool
from st_synth.generation.validation import Rejected, parse_example_keyed, parse_tasks

logger = logging.getLogger(__name__)


class SyntheticDatasetBuilder:
    """Generate the paper's synthetic data through any OpenAI-compatible endpoint.

    Example::

        from st_synth import GenerationConfig, SyntheticDatasetBuilder

        config = GenerationConfig(model="gpt-4o-mini", num_examples=1000, kinds="retrieval,sts",
                                  languages="English,German", cache="cache.sqlite")
        builder = SyntheticDatasetBuilder(config)
        dataset = builder.build()          # one split per kind: anchor, positive[, negative]
        builder.save("synthetic-data")     # the texts, metadata/ beside them, generation_report.json

    ``builder.examples`` holds the same examples in the working form (instruction, query, positive[,
    negative], language, template) and ``builder.metadata`` what is saved in ``metadata/``
    (:mod:`st_synth.data.examples`).
    """

    def __init__(
        self,
        config: GenerationConfig,
        client: openai.AsyncOpenAI | None = None,
        *,
        health_check: Callable[[], None] | None = None,
        report_extra: dict[str, Any] | None = None,
        corpus: Corpus | None = None,
        deferred: bool = False,
    ) -> None:
        """``health_check``: called after a failed connection, raises when the endpoint's server has died
        (a managed local server's ``check_alive``); ``report_extra``: added to the report (the server);
        ``corpus``: ``config.corpus`` already loaded (else loaded here, before any request); ``deferred``:
        the batch route (:mod:`st_synth.generation.batch`): send nothing, collect the requests the cache cannot answer
        in ``pending`` (cache key -> Batch API line), needing no endpoint and no key."""
        self.config = config
        self.deferred = deferred
        self.pending: dict[str, dict[str, Any]] = {}
        if deferred and not config.model:
            raise ValueError(
                "No generator model given; pass --model NAME (the name the batch engine serves)."
            )
        if not deferred:
            config.validate_endpoint_settings()
        self.corpus = corpus if corpus is not None or not config.corpus else Corpus.load(config)
        self._client = client
        self.health_check = health_check
        self.report_extra = dict(report_extra or {})
        self.dataset: DatasetDict | None = None
        self.examples: DatasetDict | None = None
        self.metadata: DatasetDict | None = None
        self.report: dict[str, Any] | None = None
        self.server: Any = None  # the managed local server answering this build, if any (served_builder)

    def shard_indices(self) -> ShardIndices:
        c = self.config
        return ShardIndices(c.num_examples, c.block_size, c.num_shards, c.shard_index)

    def plan(self, index: int) -> ExamplePlan:
        """What example ``index`` is (kind, languages, passage): drawn from the seed alone."""
        c = self.config
        plan = plan_example(c.seed, index, c.kind_weights, c.language_weights)
        if plan.kind not in c.grounded:  # () without a corpus
            return plan
        return replace(plan, passage=self.corpus.draw(c.seed, index))

    def shard_plans(self) -> list[ExamplePlan]:
        return [self.plan(index) for index in self.shard_indices()]

    def build(self) -> DatasetDict:
        """Generate: plan every request from the config's seed, send what the answer cache does not hold
        (``concurrency`` at a time, retried on rate limits, 5xx and timeouts), validate and deduplicate the
        answers, and account tokens and cost.

        Returns:
            The examples in sentence-transformers' training format, one split per kind (``anchor``,
            ``positive`` and, where the kind has one, ``negative``; instructions formatted in as
            ``config.instructions`` says). ``self.report`` holds what was kept, dropped and paid for.

        Example::

            builder = SyntheticDatasetBuilder(GenerationConfig(model="gpt-4o-mini", num_examples=100))
            dataset = builder.build()
            builder.save("outputs/synthetic")
        """
        started = time.perf_counter()
        c = self.config
        cache = AnswerCache(c.cache_path)
        try:
            run = _Run(self, cache)
            try:
                asyncio.run(run.execute())
            finally:
                self.report = {**run.report(time.perf_counter() - started), **self.report_extra}
        finally:
            cache.close()
        # A batch round with requests still pending has no dataset yet (st_synth.generation.batch).
        self.examples = DatasetDict() if self.pending else run.to_dataset()
        self.dataset, self.metadata = to_saved(self.examples, c.instruction_format)
        return self.dataset

    def save(self, output: str | Path) -> Path:
        """Write what :meth:`build` made to ``output``: the texts per kind (``load_from_disk(output)``), their
        metadata under ``output/metadata`` and ``generation_report.json``. Returns ``output``."""
        if self.dataset is None or self.report is None:
            raise RuntimeError("Call build() before save().")
        output = Path(output)
        write_saved(self.dataset, self.metadata, output)
        (output / REPORT_FILE).write_text(json.dumps(self.report, indent=2, ensure_ascii=False) + "\n")
        return output


DEFERRED = object()  # an answer that waits for a batch (st_synth.generation.batch): neither kept nor dropped


class _Run:
    """The mutable state of one build: workers, brainstorm pools, kept examples, drops."""

    eager_duplicates = True  # off only to check that replacing duplicates early changes nothing

    def __init__(self, builder: SyntheticDatasetBuilder, cache: AnswerCache) -> None:
        c = builder.config
        self.config = c
        self.corpus = builder.corpus
        # Plans are drawn when a worker reaches them and forgotten once settled: nothing per example is held
        # for the whole run but the settled examples' fixed-size keys (ExactKeys, NearDuplicateIndex).
        self.builder = builder
        self.indices = builder.shard_indices()
        self.live: dict[int, ExamplePlan] = {}  # plans taken by a worker, not settled yet
        self._owns_clients = builder._client is None
        api = builder._client or ([] if builder.deferred else make_clients(c))
        self.chat = ChatClient(
            api,
            c.model or "",
            cache,
            concurrency=c.concurrency,
            temperature=c.temperature,
            top_p=c.top_p,
            response_format=c.response_format,
            retry=RetryPolicy(max_retries=c.max_retries, base_delay=c.retry_base_delay),
            health_check=builder.health_check,
            deferred=builder.pending if builder.deferred else None,
        )
        self.budget = c.failure_budget if c.failure_budget is not None else 2 * len(self.indices) + 20
        # Kept answers not settled yet: the walk (_walk) settles them in index order and spools them to disk.
        self.kept: dict[int, Kept] = {}
        # Dedup key -> the lowest index whose FIRST kept answer has that key, among examples not settled yet
        # (see _claim); first_keys: each such index's first key, to forget the entry when it is settled.
        self.first_owner: dict[bytes, int] = {}
        self.first_keys: dict[int, bytes] = {}
        self.done: set[int] = set()  # examples whose worker has finished, not yet walked
        self.position = 0  # the walk's place in self.indices: every example below it is settled
        self.finished = False
        # The keys of settled examples and of answers dropped as near-duplicates (see _settle_final).
        self.seen = ExactKeys()
        self.near = (
            {
                kind: NearDuplicateIndex(c.near_duplicate_threshold, c.cache_path.parent)
                for kind in c.kind_weights
            }
            if c.near_duplicates
            else None
        )
        self.grounded = frozenset(c.grounded)  # the kinds read from a passage (none without a corpus)
        self.spool = Spool(c.cache_path.parent, self.grounded)
        self.settled = 0
        self.kept_kind: Counter = Counter()
        self.kept_language: Counter = Counter()
        self.kept_template: Counter = Counter()
        self.near_by_kind: Counter = Counter()
        self.passages_used: dict[str, set[int]] = {
            kind: set() for kind in c.kind_weights if kind in self.grounded
        }
        self.abandoned: set[int] = set()
        self.waiting: set[int] = set()  # examples whose next request waits for a batch
        self.drops: Counter = Counter()
        self.drops_by_kind: Counter = Counter()
        self.failures = 0
        self.stop_reason: str | None = None
        self.pools: dict[tuple[str, int], asyncio.Future] = {}  # blocks the walk has not passed
        # The kinds that brainstorm in a block, as pools are started.
        self.block_kinds: dict[int, set[str]] = {}
        # Twice as many workers as request slots keep every slot busy, plus two blocks' worth, so that
        # the examples of a block whose brainstorm answer is slow (the heavy tail) can wait for it
        # without leaving slots idle. Brainstorms are started as far ahead as the workers span.
        self.num_workers = 2 * c.concurrency + 2 * c.block_size
        self._lookahead = -(-self.num_workers // c.block_size) * c.num_shards + 1
        self.progress = tqdm(total=len(self.indices), desc="examples", disable=not c.show_progress, unit="ex")

    def _brainstorms(self, kind: str) -> bool:
        if kind in self.grounded:
            return grounding.needs_brainstorm(kind, self.config.prompts_version, self._variant(kind))
        return TASK_KINDS[kind].brainstorm

    def _variant(self, kind: str) -> str | None:
        """The grounded prompt ``kind`` uses beside its own (``grounded_prompts``), or None."""
        return self.config.grounded_prompts.get(kind)

    def _drop(self, reason: str, kind: str) -> None:
        self.drops[reason] += 1
        self.drops_by_kind[kind] += 1
        self.failures += 1
        if self.failures > self.budget and self.stop_reason is None:
            self.stop_reason = f"failure budget of {self.budget} dropped answers exhausted"
            logger.error("Stopping: %s. Drops so far: %s", self.stop_reason, dict(self.drops))

    async def execute(self) -> None:
        pending = iter(self.indices)
        wake = asyncio.Event()

        async def worker() -> None:
            while self.stop_reason is None and (index := next(pending, None)) is not None:
                plan = self.live[index] = self.builder.plan(index)
                if (kept := await self._example(plan, 0)) is not None and self.eager_duplicates:
                    await self._claim(plan.index, kept)
                self.done.add(plan.index)
                wake.set()

        async def walker() -> None:
            """Settle examples in index order as soon as every example below them is settled."""
            while not self.finished:
                wake.clear()
                position = self.position
                await self._walk(final=False)
                if self.position == position and not self.finished:
                    await wake.wait()

        workers = [asyncio.ensure_future(worker()) for _ in range(self.num_workers)]
        walking = asyncio.ensure_future(walker())
        running = asyncio.gather(*workers)
        try:
            await asyncio.wait([running, walking], return_when=asyncio.FIRST_COMPLETED)
            if walking.done():
                walking.result()  # the walker only ends early by an error: raise it
            await running
            self.finished = True
            wake.set()
            await walking
            await self._walk(final=True)  # after a stop: the examples never finished are skipped
        except BaseException:
            for task in [*workers, walking]:
                task.cancel()
            await asyncio.gather(running, walking, return_exceptions=True)  # their errors are retrieved here
            raise
        finally:
            self.progress.close()
            for index in (self.near or {}).values():
                index.close()
            if self._owns_clients:
                await self.chat.close()

    async def _tasks_for(self, plan: ExamplePlan) -> list[str] | None:
        block = plan.index // self.config.block_size
        # Start the brainstorms of the next blocks now, so that workers moving on to them find their
        # task pools ready instead of all waiting on one request.
        for ahead in range(block, block + self._lookahead + 1):
            key = (plan.kind, ahead)
            if key not in self.pools and plan.kind in self._brainstorming_kinds(ahead):
                self.pools[key] = asyncio.ensure_future(self._brainstorm(*key))
        return await asyncio.shield(self.pools[(plan.kind, block)])

    def _brainstorming_kinds(self, block: int) -> set[str]:
        """The kinds of block ``block``'s examples whose prompts need a brainstormed task pool (none for a
        block of another shard or past the end)."""
        if block not in self.block_kinds:
            kinds = {self.builder.plan(i).kind for i in self.indices.block(block)}
            self.block_kinds[block] = {kind for kind in kinds if self._brainstorms(kind)}
        return self.block_kinds[block]

    def _forget_blocks_below(self, block: int) -> None:
        """The walk has settled every example of the blocks below ``block``: their task pools are no longer
        asked for."""
        for key in [key for key, pool in self.pools.items() if key[1] < block and pool.done()]:
            del self.pools[key]
        for old in [old for old in self.block_kinds if old < block]:
            del self.block_kinds[old]

    async def _brainstorm(self, kind: str, block: int) -> list[str] | None:
        for attempt in range(self.config.max_attempts):
            if self.stop_reason is not None:
                return None
            if kind in self.grounded:
                request = grounding.brainstorm_request(
                    self.config.seed, TASK_KINDS[kind], block, attempt, self.corpus.passages,
                    self.config.prompts_version,
                )  # fmt: skip
            else:
                request = brainstorm_request(
                    self.config.seed, TASK_KINDS[kind], block, attempt, self.config.prompts_version
                )
            request = self._capped(request)
            parse = (
                (lambda content, k=TASK_KINDS[kind]: grounding.parse_tasks(k, content))
                if kind in self.grounded
                else parse_tasks
            )
            result = await self._answer(request, parse)
            if not isinstance(result, str):
                return result  # the tasks, or DEFERRED
            self._drop(f"brainstorm:{result}", kind)
        return None

    def _capped(self, request: ChatRequest) -> ChatRequest:
        cap = self.config.max_tokens
        return request if cap is None or request.max_tokens <= cap else replace(request, max_tokens=cap)

    async def _answer(self, request: ChatRequest, parse) -> Any:
        """The parsed answer to ``request``, or the reason (a string) it cannot be used."""
        try:
            answer = await self.chat.complete(request)
        except RequestRefused as refused:
            return refused.reason
        except Deferred:
            return DEFERRED
        content = answer.content
        if answer.finish_reason == "length":
            if request.schema is not None:
                return "truncated"
            content = grounding.whole_sentences(content)  # prose: its complete sentences, if long enough
        try:
            return parse(content)
        except Rejected as rejected:
            return rejected.reason

    async def _example(self, plan: ExamplePlan, first_attempt: int) -> Kept | None:
        kind = TASK_KINDS[plan.kind]
        version = self.config.prompts_version
        for attempt in range(first_attempt, self.config.max_attempts):
            if self.stop_reason is not None:
                return None
            brainstorms = self._brainstorms(plan.kind)
            tasks = await self._tasks_for(plan) if brainstorms else None
            if tasks is DEFERRED:
                self.waiting.add(plan.index)
                return None
            if brainstorms and tasks is None:
                break
            if self.corpus is not None and plan.passage is not None:
                passage = self.corpus.passages[plan.passage]
                variant = self._variant(plan.kind)
                request = grounding.example_request(self.config.seed, plan, attempt, tasks, passage, version,
                                                    variant)  # fmt: skip

                def parse(content, kind=kind, passage=passage, task=request.instruction, variant=variant):
                    return grounding.parse_answer(content, kind, passage, task, version, variant)
            else:
                request = example_request(self.config.seed, plan, attempt, tasks, version)

                def parse(content, kind=kind):
                    return parse_example_keyed(content, kind)

            result = await self._answer(self._capped(request), parse)
            if result is DEFERRED:
                self.waiting.add(plan.index)
                return None
            if isinstance(result, str):
                self._drop(result, plan.kind)
                continue
            texts, normalized = result
            instruction = request.instruction or ""
            template = request.template
            if brainstorms and plan.passage is None:
                brainstorm = brainstorm_template(self.config.seed, plan.kind, plan.index // self.config.block_size,
                                                 version)  # fmt: skip
                template = f"{brainstorm}+{template}"
            key = exact_key(plan.kind, normalized)
            kept = Kept(attempt=attempt, instruction=instruction, texts=texts, key=key, template=template)
            self.kept[plan.index] = kept
            self.progress.update(1)
            return kept
        self.abandoned.add(plan.index)
        return None

    async def _claim(self, index: int, kept: Kept) -> None:
        """Replace, right away, answers that the final walk is certain to find duplicates.

        If a lower index's FIRST kept answer has an answer's key, then by the time the walk of
        :meth:`_resolve_duplicates` reaches the answer's index the key is taken (whatever the lower index
        ends with, its first answer's key was kept either by it or by an index below it). Moving such an
        answer on to its next attempt now gives what the walk would, concurrently with the rest of the run
        instead of one request at a time after it. ``kept`` is ``index``'s first answer; only first
        answers are recorded, replacements are checked against them and otherwise left to the walk.
        """
        if kept.key in self.seen:  # a settled example has it (or had it and was dropped as a near-duplicate)
            await self._settle(index)
            return
        self.first_keys[index] = kept.key
        owner = self.first_owner.setdefault(kept.key, index)
        if owner != index:
            self.first_owner[kept.key] = min(owner, index)
            await self._settle(max(owner, index))

    def _taken(self, key: bytes, index: int) -> bool:
        return key in self.seen or self.first_owner.get(key, index) < index

    async def _settle(self, index: int) -> None:
        """``index``'s answer is a certain duplicate: move on until one is not (or attempts run out)."""
        kept = await self._replace(index)
        while kept is not None and self._taken(kept.key, index):
            kept = await self._replace(index)

    async def _replace(self, index: int, reason: str = "duplicate") -> Kept | None:
        """Drop ``index``'s kept answer as a (near-)duplicate; return its next valid, not yet judged answer."""
        plan = self.live[index]
        kept = self.kept.pop(index)
        self._drop(reason, plan.kind)
        if reason == "near_duplicate":
            self.near_by_kind[plan.kind] += 1
        self.progress.update(-1)
        return await self._example(plan, kept.attempt + 1)

    async def _walk(self, final: bool) -> None:
        """Settle examples in index order: one that repeats a settled example (exactly, or nearly) moves on to
        its next attempt; one that does not is final and goes to the spool.

        Sequential by design: whether example i repeats depends only on examples below i, which are settled
        by the time the walk reaches i, so the outcome is the same for every schedule. During the run the
        walk stops at the first example whose worker has not finished (``final``: after the workers, it
        skips them), so kept examples leave memory about as fast as they arrive.
        """
        block_size = self.config.block_size
        while self.position < len(self.indices):
            index = self.indices[self.position]
            if not final and index not in self.done:
                return
            if index % block_size == 0:
                self._forget_blocks_below(index // block_size)
            await self._settle_final(index)
            self.done.discard(index)
            self.live.pop(index, None)
            first_key = self.first_keys.pop(index, None)
            if first_key is not None and self.first_owner.get(first_key) == index:
                del self.first_owner[first_key]  # from now on self.seen answers for it (see _claim)
            self.position += 1

    async def _settle_final(self, index: int) -> None:
        kept = self.kept.get(index)
        if kept is None:
            return
        plan = self.live[index]
        near = self.near[plan.kind] if self.near is not None else None
        while kept is not None:
            if kept.key in self.seen:
                kept = await self._replace(index, "duplicate")
                continue
            sig = signature(kept.texts) if near is not None else None
            if near is not None and near.find(sig) is not None:
                # Its key is marked too, so that the same answer elsewhere is an exact duplicate: then "a lower
                # index's first answer had this key" always means "the key is taken" (_claim).
                self.seen.add(kept.key)
                kept = await self._replace(index, "near_duplicate")
                continue
            break
        if kept is None:
            return
        self.seen.add(kept.key)
        if near is not None:
            near.add(sig, index)
        del self.kept[index]
        self.spool.add(plan, kept)
        self.settled += 1
        self.kept_kind[plan.kind] += 1
        self.kept_language[plan.language_label] += 1
        self.kept_template.update(t for t in kept.template.split("+") if t)
        if plan.passage is not None:
            self.passages_used[plan.kind].add(plan.passage)

    def report(self, wall_time: float) -> dict[str, Any]:
        c, s = self.config, self.chat.stats
        kept_kind, kept_language, kept_template = self.kept_kind, self.kept_language, self.kept_template
        complete = self.settled == len(self.indices)
        report: dict[str, Any] = {
            **c.public_settings(),
            "num_examples_requested": len(self.indices),
            "num_examples_kept": self.settled,
            "complete": complete,
            "stop_reason": None
            if complete
            else self.stop_reason
            or (
                f"{len(self.waiting)} examples wait for a batch of {len(self.chat.deferred)} requests"
                if self.waiting
                else "some examples used up their attempts"
            ),
            "requests_sent": s.requests_sent,
            "answers_stored": s.answers_stored,
            "cache_hits": s.cache_hits,
            "retries": s.retries,
            "format_downgrades": s.format_downgrades,
            "response_formats": dict(s.modes),
            "transient_errors": dict(s.errors),
            "prompt_tokens": s.prompt_tokens,
            "completion_tokens": s.completion_tokens,
            "total_prompt_tokens": s.prompt_tokens + s.cached_prompt_tokens,
            "total_completion_tokens": s.completion_tokens + s.cached_completion_tokens,
            "tokens_by_kind": s.tokens_by_kind,
            "drops": dict(sorted(self.drops.items())),
            "drops_by_kind": {k: self.drops_by_kind[k] for k in c.kind_weights},
            "near_duplicates_by_kind": {k: self.near_by_kind[k] for k in c.kind_weights},
            "abandoned_examples": len(self.abandoned),
            **(
                {
                    "batch": {
                        "pending_requests": len(self.chat.deferred),
                        "waiting_examples": len(self.waiting),
                    }
                }
                if self.chat.deferred is not None
                else {}
            ),
            "kept_by_kind": {k: kept_kind[k] for k in c.kind_weights},
            "kept_by_language": dict(kept_language.most_common()),
            "kept_by_template": dict(sorted(kept_template.items())),
            "wall_time_s": round(wall_time, 3),
        }
        if self.corpus is not None:
            used = set().union(*self.passages_used.values())
            report["corpus"] = {
                **report["corpus"],
                **self.corpus.describe(),
                "passages_used": len(used),
                "passages_used_by_kind": {k: len(used_by) for k, used_by in self.passages_used.items()},
                "passages_used_by_source": dict(Counter(self.corpus.passage_sources[p] for p in used)),
            }
        if s.batch_prompt_tokens or s.batch_completion_tokens:
            report["batch_prompt_tokens"] = s.batch_prompt_tokens
            report["batch_completion_tokens"] = s.batch_completion_tokens
        if c.priced:
            report["cost_usd"] = c.cost(s.prompt_tokens, s.completion_tokens)
            online_in = report["total_prompt_tokens"] - s.batch_prompt_tokens
            online_out = report["total_completion_tokens"] - s.batch_completion_tokens
            report["total_cost_usd"] = round(
                c.cost(online_in, online_out)
                + c.cost(s.batch_prompt_tokens, s.batch_completion_tokens, batch=True),
                6,
            )
        return report

    def to_dataset(self) -> DatasetDict:
        """One split per kind that kept examples (``datasets`` cannot reload a saved empty split), read from
        the spool's Arrow files (memory-mapped)."""
        return self.spool.finish(self.config.kind_weights)
