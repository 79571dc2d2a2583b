"""Build a synthetic embedding dataset: plan, request, validate, deduplicate, account, save.

Determinism contract: example ``i`` is the first *valid, non-duplicate* answer among its attempts
``0, 1, 2, ...``, and each attempt is a request fixed by ``(seed, i, attempt)``. So the dataset does not
depend on concurrency, on completion order, on faults that were retried, on a restart from the cache, or
on how the examples were split into shards.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import openai
from datasets import Dataset, DatasetDict, Features, Value
from tqdm.auto import tqdm

from st_synth import grounding
from st_synth.arguments import decode_json
from st_synth.cache import AnswerCache
from st_synth.client import (
    RESPONSE_FORMATS,
    ChatClient,
    Deferred,
    RequestRefused,
    RetryPolicy,
    is_loopback,
    redact_url,
)
from st_synth.corpus import Corpus, CorpusArguments
from st_synth.grounding import check_groundable, check_prompt_variants
from st_synth.languages import resolve_language_weights
from st_synth.local_llm import BACKENDS, SMOLLM2_ALIAS, backend_generation_defaults, serving
from st_synth.names import REPORT_FILE
from st_synth.neardup import ExactKeys, NearDuplicateIndex, check_threshold, exact_key, signature
from st_synth.prompting import (
    DEFAULT_PROMPTS_VERSION,
    PROMPT_VERSIONS,
    ChatRequest,
    ExamplePlan,
    brainstorm_request,
    brainstorm_template,
    check_prompts_version,
    example_request,
    plan_example,
)
from st_synth.taxonomy import (
    BITEXT_LOW_SCORES,
    PROVENANCE_COLUMNS,
    TASK_KINDS,
    get_kind,
    kinds_help,
    resolve_kind_weights,
)
from st_synth.validation import Rejected, parse_example_keyed, parse_tasks

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_REQUEST_TIMEOUT = 120.0
# Limits whose default depends on the endpoint (None: decided in GenerationConfig.__post_init__).
STANDARD_LIMITS: dict[str, Any] = {"max_tokens": None, "request_timeout": DEFAULT_REQUEST_TIMEOUT,
                                   "response_format": "auto"}  # fmt: skip
CONNECTIONS_PER_CLIENT = 8


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class GenerationConfig(CorpusArguments):
    """Everything that shapes a synthetic dataset, the local server included: the fields of ``st-synth
    generate`` (flags of the same names) and of the ``generate`` section of an ``st-synth run`` YAML file.
    Validated on creation, before any request or server start. With ``corpus`` (the fields of
    :class:`~st_synth.corpus.CorpusArguments`) every example is grounded in a passage of it
    (:mod:`st_synth.grounding`)."""

    model: str | None = field(
        default=None,
        metadata=_help(
            "Generator model name as the endpoint serves it (default with --local: the packaged SmolLM2)."
        ),
    )
    num_examples: int = field(default=100, metadata=_help("Examples to KEEP (after validation)."))
    kinds: str | list[str] | dict[str, float] | None = field(
        default=None,
        metadata=_help(
            "'paper' (the paper's Figure 2 proportions: retrieval 33%, classification 24%, sts 20%, bitext 18%, long_long "
            "3%, short_short 3%) or comma-separated kinds, optionally weighted (retrieval=3,sts=1); a list or mapping in "
            f"YAML. Default: all {len(TASK_KINDS)}, uniform, so that a run of a few hundred examples has every kind. "
            f"Kinds: {kinds_help()}.",
            flag_type=str | None,
            metavar="KINDS",
        ),
    )
    languages: str | list[str] | dict[str, float] | None = field(
        default="paper",
        metadata=_help(
            "'paper' (the paper's weighted mix of 93 languages) or comma-separated names; a list or mapping in YAML.",
            flag_type=str,
            metavar="LANGUAGES",
        ),
    )
    grounded_kinds: str | list[str] | None = field(
        default=None,
        metadata=_help(
            "With a corpus: the kinds grounded in it, comma-separated (a list in YAML); the other kinds of --kinds "
            "are free generation, as without a corpus, in the same run and dataset. Default: every kind.",
            flag_type=str | None,
            metavar="KINDS",
        ),
    )
    grounded_prompts: str | dict[str, str] | None = field(
        default=None,
        metadata=_help(
            "With a corpus: another shipped prompt for a grounded kind, as kind=prompt (a mapping in YAML), e.g. "
            "long_long=retelling (the passage retold in prose: a long text beside the long passage, as the paper's "
            "long-long matching pairs two). Default: each kind's own (a title, a summary, ...).",
            flag_type=str | None,
            metavar="KIND=PROMPT",
        ),
    )
    seed: int = field(default=42, metadata=_help("Fixes every request: same seed, same dataset."))
    prompts_version: str = field(
        default="auto",
        metadata=_help(
            "Prompt templates: v2 (the paper's meaning, several variants per kind, one drawn per example) or v1 "
            "(one template per kind; reproduces datasets made before v2). auto: v2, except v1 for the packaged "
            "SmolLM2-135M behind --local, whose brainstorms under v2 came back empty or unusable (docs/generation.md). "
            "Answers of two versions never share a cache entry.",
            choices=["auto", *PROMPT_VERSIONS],
        ),
    )
    base_url: str | None = field(
        default=None,
        metadata=_help(f"OpenAI-compatible endpoint (default: $OPENAI_BASE_URL, else {DEFAULT_BASE_URL})."),
    )
    api_key_env: str = field(
        default="OPENAI_API_KEY",
        metadata=_help("Environment variable holding the API key (never pass keys on the command line)."),
    )
    local: bool = field(
        default=False,
        metadata=_help(
            "Start a local server on 127.0.0.1 serving the packaged SmolLM2-135M-Instruct for this run (needs the "
            "'local' extra); model and endpoint then default to it."
        ),
    )
    llm_backend: str = field(
        default="auto",
        metadata=_help(
            "Server behind --local: llama.cpp (fast, schema-constrained JSON) or transformers (`transformers serve`: "
            "no compile step, about 10x slower); auto takes llama.cpp where llama-cpp-python is installed and falls "
            "back to transformers when it fails its warm-up.",
            choices=list(BACKENDS),
        ),
    )
    llm_threads: int = field(default=1, metadata=_help("CPU threads of the local server."))
    concurrency: int = field(default=16, metadata=_help("Requests in flight at once."))
    temperature: float = field(default=1.0, metadata=_help("Sampling temperature of the generator."))
    top_p: float = field(default=1.0, metadata=_help("Nucleus sampling of the generator."))
    response_format: str | None = field(
        default=None,
        metadata=_help(
            "How to ask for JSON: auto (the strictest the endpoint accepts; the default, except text behind the "
            f"transformers local backend, which ignores response_format) or one of {', '.join(RESPONSE_FORMATS)}."
        ),
    )
    cache: str | None = field(
        default=None,
        metadata=_help(
            "SQLite answer cache (default: ~/.cache/st_synth/answers.sqlite): a re-run pays nothing twice."
        ),
    )
    num_shards: int = field(default=1, metadata=_help("Split the examples over this many machines."))
    shard_index: int = field(default=0, metadata=_help("This machine's shard, 0 .. num_shards-1."))
    block_size: int = field(default=64, metadata=_help("Examples that share one brainstormed task pool."))
    max_attempts: int = field(default=5, metadata=_help("Attempts per example before giving it up."))
    failure_budget: int | None = field(
        default=None,
        metadata=_help("Dropped answers allowed before the run stops (default: 2 x examples + 20)."),
    )
    request_timeout: float | None = field(
        default=None,
        metadata=_help(
            f"Seconds per request (default {DEFAULT_REQUEST_TIMEOUT:g}; 600 behind the transformers local backend)."
        ),
    )
    max_tokens: int | None = field(
        default=None,
        metadata=_help(
            "Cap on completion tokens per request (default: each kind's own budget, 384-2048; 384 behind the "
            "transformers local backend)."
        ),
    )
    max_retries: int = field(default=8, metadata=_help("Retries of one request on 429/5xx/timeouts."))
    retry_base_delay: float = field(
        default=0.5,
        metadata=_help(
            "Seconds before the first retry; doubled at each (with jitter; a Retry-After header wins)."
        ),
    )
    price_prompt_per_million: float | None = field(
        default=None, metadata=_help("Price per million prompt tokens, for the report's cost.")
    )
    price_completion_per_million: float | None = field(
        default=None, metadata=_help("Price per million completion tokens, for the report's cost.")
    )
    batch_price_prompt_per_million: float | None = field(
        default=None,
        metadata=_help(
            "Price per million prompt tokens of answers from a batch engine (OpenAI's Batch API: half the online "
            "price); default: the online price."
        ),
    )
    batch_price_completion_per_million: float | None = field(
        default=None,
        metadata=_help(
            "Price per million completion tokens of answers from a batch engine; default: the online price."
        ),
    )
    near_duplicates: bool = field(
        default=True,
        metadata=_help(
            "Replace near-duplicate examples, not only exact ones: an example whose texts share at least "
            "near_duplicate_threshold of their character 5-grams (MinHash Jaccard) with a lower-index example of "
            "its kind is asked again (--no_near_duplicates keeps them)."
        ),
    )
    near_duplicate_threshold: float = field(
        default=0.8,
        metadata=_help("Jaccard similarity (0.8 to 1.0) from which two examples are near-duplicates."),
    )
    show_progress: bool = field(default=True, metadata=_help("A progress bar (--no_show_progress hides it)."))
    kind_weights: dict[str, float] = field(init=False, repr=False)
    grounded: tuple[str, ...] = field(init=False, repr=False, default=())  # the kinds grounded in the corpus
    language_weights: dict[str, float] = field(init=False, repr=False)
    # The limits left unset (None): decided here (the local backend's where it needs its own, else the
    # standard ones), and again by the server that actually answers (auto may fall back to transformers).
    unset_limits: frozenset[str] = field(init=False, repr=False, default=frozenset())

    def __post_init__(self) -> None:
        super().__post_init__()
        # A YAML list or mapping reaches here as JSON through its flag (st_synth.arguments).
        self.kinds, self.languages = (
            decode_json(self.kinds, "kinds"),
            decode_json(self.languages, "languages"),
        )
        self.kind_weights = resolve_kind_weights(self.kinds)
        if self.prompts_version != "auto":
            check_prompts_version(self.prompts_version)
        self.language_weights = resolve_language_weights(self.languages)
        checks = [
            (isinstance(self.num_examples, int) and self.num_examples > 0,
             f"num_examples must be a positive integer, got {self.num_examples!r}"),
            (self.concurrency >= 1, f"concurrency must be at least 1, got {self.concurrency}"),
            (self.num_shards >= 1, f"num_shards must be at least 1, got {self.num_shards}"),
            (0 <= self.shard_index < self.num_shards,
             f"shard_index must be in 0..{self.num_shards - 1}, got {self.shard_index}"),
            (self.block_size >= 1, f"block_size must be at least 1, got {self.block_size}"),
            (self.max_attempts >= 1, f"max_attempts must be at least 1, got {self.max_attempts}"),
            (self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 16),
             f"max_tokens must be an integer of at least 16 (or unset), got {self.max_tokens!r}"),
            (self.request_timeout is None or self.request_timeout > 0,
             f"request_timeout must be positive, got {self.request_timeout}"),
            (self.llm_backend in BACKENDS,
             f"llm_backend {self.llm_backend!r} is unknown; choose one of: {', '.join(BACKENDS)}"),
            (self.llm_threads >= 1, f"llm_threads must be at least 1, got {self.llm_threads}"),
            (not (self.local and self.base_url),
             "local starts its own endpoint on 127.0.0.1; drop base_url or local"),
            (0 <= self.temperature <= 2, f"temperature must be in [0, 2], got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.response_format in (None, "auto") or self.response_format in RESPONSE_FORMATS,
             f"response_format {self.response_format!r} is unknown; choose auto, {', '.join(RESPONSE_FORMATS)}"),
            (not (bilingual := [k for k in self.kind_weights if TASK_KINDS[k].bilingual])
             or len(self.language_weights) >= 2,
             f"{' and '.join(bilingual)} examples pair two different languages; give at least two languages "
             f"or drop {', '.join(map(repr, bilingual))}"),
            *((getattr(self, name) is None or getattr(self, name) >= 0, f"{name} must not be negative, got "
               f"{getattr(self, name)}") for name in ("price_prompt_per_million", "price_completion_per_million",
              "batch_price_prompt_per_million", "batch_price_completion_per_million")),
        ]  # fmt: skip
        if self.near_duplicates:
            check_threshold(self.near_duplicate_threshold)
        self.grounded_kinds, self.grounded_prompts = (
            decode_json(self.grounded_kinds, "grounded_kinds"),
            decode_json(self.grounded_prompts, "grounded_prompts"),
        )
        self.grounded_prompts = _kind_mapping(self.grounded_prompts, "grounded_prompts")
        if not self.corpus and (self.grounded_kinds or self.grounded_prompts):
            raise ValueError(
                "grounded_kinds and grounded_prompts choose how a corpus is used: give --corpus too."
            )
        if self.corpus:  # first: with a corpus, a kind that cannot be grounded is the problem to name
            self.grounded = tuple(self.kind_weights) if self.grounded_kinds is None else tuple(
                resolve_kind_weights(self.grounded_kinds))  # fmt: skip
            if absent := [kind for kind in self.grounded if kind not in self.kind_weights]:
                raise ValueError(
                    f"grounded_kinds names {', '.join(absent)}, not among the run's kinds "
                    f"({', '.join(self.kind_weights)}); add it to kinds or drop it."
                )
            check_groundable(list(self.grounded))
            check_prompt_variants(self.grounded_prompts, list(self.grounded))
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.corpus and len(self.language_weights) != 1:
            raise ValueError(
                "Generation grounded in a corpus writes in the corpus's language: name that one language "
                "with --languages (e.g. English), not the paper's mix."
            )
        self.unset_limits = frozenset(name for name in STANDARD_LIMITS if getattr(self, name) is None)
        backend = backend_generation_defaults(self.llm_backend) if self.local else {}
        for name in self.unset_limits:
            setattr(self, name, backend.get(name, STANDARD_LIMITS[name]))
        if self.local and self.model is None:
            self.model = SMOLLM2_ALIAS
        # The packaged 135M model cannot follow v2's brainstorms (docs/generation.md).
        if self.prompts_version == "auto":
            self.prompts_version = (
                "v1" if self.local and self.model == SMOLLM2_ALIAS else DEFAULT_PROMPTS_VERSION
            )

    @property
    def cache_path(self) -> Path:
        return Path(self.cache) if self.cache else Path.home() / ".cache" / "st_synth" / "answers.sqlite"

    @property
    def resolved_base_url(self) -> str:
        return self.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL

    @property
    def priced(self) -> bool:
        """Whether any price was given (the report then has a cost)."""
        return any(
            price is not None
            for price in (self.price_prompt_per_million, self.price_completion_per_million,
                          self.batch_price_prompt_per_million, self.batch_price_completion_per_million)
        )  # fmt: skip

    def cost(self, prompt_tokens: int, completion_tokens: int, batch: bool = False) -> float:
        """US dollars for these tokens, online or through a batch engine (at the online price where no batch
        price was given)."""
        p_in, p_out = self.price_prompt_per_million or 0.0, self.price_completion_per_million or 0.0
        if batch:
            p_in = (
                p_in if self.batch_price_prompt_per_million is None else self.batch_price_prompt_per_million
            )
            p_out = (
                p_out
                if self.batch_price_completion_per_million is None
                else self.batch_price_completion_per_million
            )
        return round((prompt_tokens * p_in + completion_tokens * p_out) / 1e6, 6)

    def api_key(self) -> str:
        """The key from the environment; a local endpoint may go without one, a remote one may not."""
        key = os.environ.get(self.api_key_env)
        if key:
            return key
        if is_loopback(self.resolved_base_url):
            return "no-key-needed-locally"
        raise ValueError(
            f"No API key for {redact_url(self.resolved_base_url)}: set the environment variable "
            f"{self.api_key_env} (or choose another variable with --api_key_env)."
        )

    def validate_endpoint_settings(self) -> None:
        if self.local:  # the local server is the endpoint: its model and URL are known once it runs
            return
        if not self.model:
            raise ValueError("No generator model given; pass --model NAME (the name the endpoint serves).")
        self.api_key()

    def public_settings(self) -> dict[str, Any]:
        """Settings for reports and cards: never the key, never credentials inside the URL."""
        return {
            "generator_model": self.model,
            "base_url": redact_url(self.resolved_base_url),
            "seed": self.seed,
            "kinds": self.kind_weights,
            "languages": "paper" if _is_paper(self.languages) else self.language_weights,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "prompts_version": self.prompts_version,
            "bitext_low_scores": list(BITEXT_LOW_SCORES),
            "num_shards": self.num_shards,
            "shard_index": self.shard_index,
            "block_size": self.block_size,
            "near_duplicate_threshold": self.near_duplicate_threshold if self.near_duplicates else None,
            **({"corpus": {"sources": self.corpus, "text_column": self.text_column,
                           "passage_tokens": self.passage_tokens, "min_tokens": self.min_tokens,
                           "passage_tokenizer": self.passage_tokenizer, "grounded_kinds": list(self.grounded),
                           "grounded_prompts": self.grounded_prompts}} if self.corpus else {}),
        }  # fmt: skip


def _kind_mapping(value: Any, name: str) -> dict[str, str]:
    """``"long_long=retelling,sts=x"`` or a mapping, as {kind: value} with kinds checked by name."""
    if not value:
        return {}
    if isinstance(value, str):
        pairs = [part.partition("=") for part in value.split(",") if part.strip()]
        if any(not sep or not right.strip() for _, sep, right in pairs):
            raise ValueError(f"{name}: {value!r} must be kind=prompt pairs, e.g. long_long=retelling.")
        value = {left.strip(): right.strip() for left, _, right in pairs}
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a mapping of kind to prompt, e.g. {{long_long: retelling}}.")
    return {get_kind(kind).name: str(prompt) for kind, prompt in value.items()}


def _is_paper(languages: object) -> bool:
    return languages is None or (isinstance(languages, str) and languages.strip().lower() == "paper")


def check_output_folder(output: str | Path) -> Path:
    """Refuse, before any request is paid for, an output the dataset could not be saved to."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ValueError(
            f"--output {output} is an existing file; give a folder for the dataset and {REPORT_FILE}."
        )
    if output.is_dir() and any(output.iterdir()) and not (output / "dataset_dict.json").is_file():
        raise ValueError(
            f"--output {output} is a folder with other files in it; give a new or empty folder (or one that "
            "holds an earlier st-synth dataset, which is replaced)."
        )
    existing = next(parent for parent in (output, *output.parents) if parent.exists())
    if not existing.is_dir():
        raise ValueError(f"--output {output} lies under {existing}, which is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--output {output}: no permission to write in {existing}.")
    return output


class ShardIndices(Sequence[int]):
    """The example indices of one shard, ascending, computed rather than held: the blocks of ``block_size``
    examples whose number is ``shard_index`` modulo ``num_shards`` (the last block may be short)."""

    def __init__(self, num_examples: int, block_size: int, num_shards: int = 1, shard_index: int = 0) -> None:
        self.num_examples, self.block_size = num_examples, block_size
        self.blocks = range(shard_index, -(-num_examples // block_size), num_shards)
        # every block is whole but the last one of all, which may be this shard's
        short = self.blocks and self.blocks[-1] == -(-num_examples // block_size) - 1
        self._len = len(self.blocks) * block_size - ((-num_examples) % block_size if short else 0)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, position):  # type: ignore[override]
        if isinstance(position, slice):
            return [self[i] for i in range(*position.indices(self._len))]
        if position < 0:
            position += self._len
        if not 0 <= position < self._len:
            raise IndexError(f"position {position} of {self._len} examples")
        return self.blocks[position // self.block_size] * self.block_size + position % self.block_size

    def __iter__(self) -> Iterator[int]:
        for block in self.blocks:
            yield from self.block(block)

    def block(self, block: int) -> range:
        """The indices of block ``block`` (none for a block of another shard or past the end)."""
        if block not in self.blocks:
            return range(0)
        return range(block * self.block_size, min((block + 1) * self.block_size, self.num_examples))


@dataclass
class _Kept:
    attempt: int
    instruction: str
    texts: tuple[str, ...]
    key: bytes  # a 16-byte digest of the kind and the normalised texts: what exact duplicates are judged on
    template: str = ""  # the template ids its prompts came from ("+"-joined: brainstorm, then example)


class SyntheticDatasetBuilder:
    """Generate the paper's synthetic data through any OpenAI-compatible endpoint.

    Example::

        from st_synth import GenerationConfig, SyntheticDatasetBuilder

        config = GenerationConfig(model="gpt-4o-mini", num_examples=1000, kinds="retrieval,sts",
                                  languages="English,German", cache="cache.sqlite")
        builder = SyntheticDatasetBuilder(config)
        dataset = builder.build()          # a DatasetDict, one split per kind
        builder.save("synthetic-data")     # save_to_disk + generation_report.json
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
        the batch route (:mod:`st_synth.batch`): send nothing, collect the requests the cache cannot answer
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
        # A batch round with requests still pending has no dataset yet (st_synth.batch).
        self.dataset = DatasetDict() if self.pending else run.to_dataset()
        return self.dataset

    def save(self, output: str | Path) -> Path:
        if self.dataset is None or self.report is None:
            raise RuntimeError("Call build() before save().")
        output = Path(output)
        self.dataset.save_to_disk(str(output))
        (output / REPORT_FILE).write_text(json.dumps(self.report, indent=2, ensure_ascii=False) + "\n")
        return output


def make_clients(config: GenerationConfig) -> list[openai.AsyncOpenAI]:
    """The openai clients of a run, on openai's aiohttp transport where aiohttp is installed.

    aiohttp costs about a third less CPU per request than httpx, which matters at high concurrency.
    Without it, several httpx clients with small pools: httpx scans a client's whole pool per request.
    """
    kwargs = dict(
        base_url=config.resolved_base_url,
        api_key=config.api_key(),
        max_retries=0,
        timeout=config.request_timeout,
    )
    try:
        return [openai.AsyncOpenAI(**kwargs, http_client=openai.DefaultAioHttpClient())]
    except RuntimeError:
        return [openai.AsyncOpenAI(**kwargs) for _ in range(-(-config.concurrency // CONNECTIONS_PER_CLIENT))]


DEFERRED = object()  # an answer that waits for a batch (st_synth.batch): neither kept nor dropped


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
        self.kept: dict[int, _Kept] = {}
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
        self.spool = _Spool(c.cache_path.parent, self.grounded)
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

    async def _example(self, plan: ExamplePlan, first_attempt: int) -> _Kept | None:
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
            kept = _Kept(attempt=attempt, instruction=instruction, texts=texts, key=key, template=template)
            self.kept[plan.index] = kept
            self.progress.update(1)
            return kept
        self.abandoned.add(plan.index)
        return None

    async def _claim(self, index: int, kept: _Kept) -> None:
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

    async def _replace(self, index: int, reason: str = "duplicate") -> _Kept | None:
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


SPOOL_PREFIX = ".st-synth-spool-"


def _remove_orphaned_spools(where: Path) -> None:
    """Remove the spools of processes that no longer run (killed before their exit handler could)."""
    for folder in where.glob(f"{SPOOL_PREFIX}*"):
        pid = folder.name[len(SPOOL_PREFIX) :].split("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # another user's process: alive
            pass


class _Spool:
    """Settled examples, written to Arrow files (one per kind, in index order) as they are settled, so that
    a run of any size holds only the examples not settled yet. The files live in a temporary folder beside
    the answer cache until the process ends (the dataset returned is memory-mapped from them)."""

    FLUSH = 4096  # rows per kind buffered before they are written

    def __init__(self, where: Path, grounded: frozenset[str]) -> None:
        self.where = where
        self.grounded = grounded
        self.folder: Path | None = None
        self.buffers: dict[str, dict[str, list[str]]] = {}
        self.writers: dict[str, Any] = {}

    def columns(self, kind: str) -> tuple[str, ...]:
        return TASK_KINDS[kind].grounded_columns() if kind in self.grounded else TASK_KINDS[kind].columns

    def add(self, plan: ExamplePlan, kept: _Kept) -> None:
        columns = self.columns(plan.kind)
        rows = self.buffers.setdefault(plan.kind, {column: [] for column in columns})
        rows["instruction"].append(kept.instruction)
        for column, text in zip(columns[1 : -len(PROVENANCE_COLUMNS)], kept.texts, strict=True):
            rows[column].append(text)
        rows["language"].append(plan.language_label)
        rows["template"].append(kept.template)
        if len(rows["instruction"]) >= self.FLUSH:
            self._flush(plan.kind)

    def _flush(self, kind: str) -> None:
        from datasets.arrow_writer import ArrowWriter

        rows = self.buffers.pop(kind, None)
        if not rows or not rows["instruction"]:
            return
        if kind not in self.writers:
            if self.folder is None:
                self.where.mkdir(parents=True, exist_ok=True)
                _remove_orphaned_spools(self.where)
                self.folder = Path(tempfile.mkdtemp(prefix=f"{SPOOL_PREFIX}{os.getpid()}-", dir=self.where))
                atexit.register(shutil.rmtree, self.folder, True)
            features = Features({column: Value("string") for column in self.columns(kind)})
            self.writers[kind] = ArrowWriter(features=features, path=str(self.folder / f"{kind}.arrow"))
        self.writers[kind].write_batch(rows)

    def finish(self, kinds: Any) -> DatasetDict:
        splits = {}
        for kind in kinds:
            self._flush(kind)
            writer = self.writers.pop(kind, None)
            if writer is None:
                logger.warning("No %s examples were kept; the dataset has no %s split.", kind, kind)
                continue
            writer.finalize()
            splits[kind] = Dataset.from_file(str(self.folder / f"{kind}.arrow"))
        return DatasetDict(splits)


@contextmanager
def served_builder(
    config: GenerationConfig, corpus: Corpus | None = None
) -> Iterator[SyntheticDatasetBuilder]:
    """The builder of a run: on the local server when ``config.local`` (started here, watched through the run,
    stopped on exit; ``builder.server`` is it), else on the configured endpoint (``builder.server`` None).
    ``corpus``: ``config.corpus`` already loaded (the run loads it once for generation, filter and mining)."""
    if corpus is None and config.corpus:  # a bad corpus fails before the server starts
        corpus = Corpus.load(config)
    with serving(config) as (served, running):
        builder = SyntheticDatasetBuilder(
            served, health_check=running.check_alive if running else None,
            report_extra={"local_server": running.describe()} if running else None, corpus=corpus,
        )  # fmt: skip
        builder.server = running
        yield builder


def generation_report_summary(report: dict[str, Any]) -> str:
    kept = ", ".join(f"{k} {v}" for k, v in report["kept_by_kind"].items())
    lines = [
        f"kept {report['num_examples_kept']}/{report['num_examples_requested']} ({kept})",
        f"requests sent {report['requests_sent']}, cache hits {report['cache_hits']}, retries {report['retries']}",
        f"tokens this run: {report['prompt_tokens']} prompt + {report['completion_tokens']} completion",
        f"drops: {report['drops'] or 'none'}",
    ]
    if imported := report.get("batch", {}).get("imported_this_run"):
        lines.insert(3, f"from batches this run: {imported['answered']} answers, {imported['prompt_tokens']} prompt + "
                        f"{imported['completion_tokens']} completion tokens")  # fmt: skip
    if "cost_usd" in report:
        lines.append(
            f"cost this run: ${report['cost_usd']:.4f} (dataset total ${report['total_cost_usd']:.4f})"
        )
    if not report["complete"]:
        lines.append(f"INCOMPLETE: {report['stop_reason']}")
    return "\n".join(lines)
