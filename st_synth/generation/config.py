"""The settings of a generation run (:class:`GenerationConfig`), validated before any request or server
start, and the endpoint that answers it (:func:`serving`: the configured one, or the local server)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from st_synth.common.arguments import decode_json
from st_synth.common.languages import resolve_language_weights
from st_synth.common.names import REPORT_FILE
from st_synth.common.taxonomy import BITEXT_LOW_SCORES, TASK_KINDS, get_kind, kinds_help, resolve_kind_weights
from st_synth.data.corpus import CorpusArguments
from st_synth.data.examples import INSTRUCTION_MODES, InstructionFormat
from st_synth.data.neardup import check_threshold
from st_synth.generation.client import RESPONSE_FORMATS, is_loopback, redact_url
from st_synth.generation.grounding import check_groundable, check_prompt_variants
from st_synth.generation.local_llm import (
    BACKENDS,
    SMOLLM2_ALIAS,
    LocalLLMServer,
    backend_generation_defaults,
    check_local_model,
    resolve_local_model,
    start_local_server,
)
from st_synth.generation.prompting import DEFAULT_PROMPTS_VERSION, PROMPT_VERSIONS, check_prompts_version
from st_synth.model.embedder import DEFAULT_INSTRUCTION_TEMPLATE

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_REQUEST_TIMEOUT = 120.0
# Limits whose default depends on the endpoint (None: decided in GenerationConfig.__post_init__).
STANDARD_LIMITS: dict[str, Any] = {"max_tokens": None, "request_timeout": DEFAULT_REQUEST_TIMEOUT,
                                   "response_format": "auto"}  # fmt: skip


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class GenerationConfig(CorpusArguments):
    """Everything that shapes a synthetic dataset, the local server included: the fields of ``st-synth
    generate`` (flags of the same names) and of the ``generate`` section of an ``st-synth run`` YAML file.
    Validated on creation, before any request or server start. With ``corpus`` (the fields of
    :class:`~st_synth.data.corpus.CorpusArguments`) every example is grounded in a passage of it
    (:mod:`st_synth.generation.grounding`)."""

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
    local_model: str | None = field(
        default=None,
        metadata=_help(
            "The model --local serves instead of the packaged SmolLM2-135M: a .gguf file, or REPO_ID:FILE.gguf on the "
            "Hub (downloaded once). --model defaults to the file's name."
        ),
    )
    llm_threads: int = field(default=1, metadata=_help("CPU threads of the local server."))
    llm_context: int = field(default=4096, metadata=_help("Context size (tokens) of the local server."))
    llm_gpu_layers: int = field(
        default=0, metadata=_help("Layers llama.cpp offloads to the GPU (-1: all; needs a CUDA/Metal build).")
    )
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
    instructions: str = field(
        default="e5",
        metadata=_help(
            "How the saved texts carry each example's task instruction: "
            + "; ".join(f"{name}: {what}" for name, what in INSTRUCTION_MODES.items())
            + ". The instruction itself is in the dataset's metadata either way.",
            choices=list(INSTRUCTION_MODES),
        ),
    )
    instruction_template: str = field(
        default=DEFAULT_INSTRUCTION_TEMPLATE,
        metadata=_help(
            "The text around the instruction ({instruction} exactly once): the embedder's query template."
        ),
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
        # A YAML list or mapping reaches here as JSON through its flag (st_synth.common.arguments).
        self.kinds, self.languages = (
            decode_json(self.kinds, "kinds"),
            decode_json(self.languages, "languages"),
        )
        self.kind_weights = resolve_kind_weights(self.kinds)
        if self.prompts_version != "auto":
            check_prompts_version(self.prompts_version)
        self.language_weights = resolve_language_weights(self.languages)
        InstructionFormat(self.instructions, self.instruction_template)  # refused here, before any request
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
            (self.llm_context >= 256, f"llm_context must be at least 256 tokens, got {self.llm_context}"),
            (self.llm_gpu_layers >= -1, f"llm_gpu_layers must be -1 (all) or more, got {self.llm_gpu_layers}"),
            (self.local or not self.local_model, "local_model is what --local serves: add --local"),
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
        if self.local_model:
            check_local_model(self.local_model)
        if self.local and self.model is None:
            self.model = self.local_alias
        # The packaged 135M model cannot follow v2's brainstorms (docs/generation.md).
        if self.prompts_version == "auto":
            self.prompts_version = (
                "v1"
                if self.local and not self.local_model and self.model == SMOLLM2_ALIAS
                else DEFAULT_PROMPTS_VERSION
            )

    @property
    def local_alias(self) -> str:
        """The name the local server answers to: the packaged model's, or the local_model file's stem."""
        if not self.local_model:
            return SMOLLM2_ALIAS
        return Path(self.local_model.rpartition(":")[2] if ":" in self.local_model else self.local_model).stem

    @property
    def instruction_format(self) -> InstructionFormat:
        """How the saved texts carry the instructions (:mod:`st_synth.data.examples`)."""
        return InstructionFormat(self.instructions, self.instruction_template)

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
            "instructions": self.instruction_format.describe(),
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


@contextmanager
def serving(config: GenerationConfig) -> Iterator[tuple[GenerationConfig, LocalLLMServer | None]]:
    """The endpoint of a generation run: ``config`` as it is (no server) unless ``config.local``; then the
    local server is started (see :func:`start_local_server`) and ``config`` is yielded pointed at the one that
    answered: its URL, its model name, and its backend's limits for every limit the user left unset."""
    if not config.local:
        yield config, None
        return
    model_path = resolve_local_model(config.local_model) if config.local_model else None
    server = LocalLLMServer(model_path, backend=config.llm_backend, alias=config.local_alias,
                            threads=config.llm_threads, context=config.llm_context,
                            gpu_layers=config.llm_gpu_layers)  # fmt: skip
    running = start_local_server(server)
    try:
        limits = {**STANDARD_LIMITS, **backend_generation_defaults(running.backend)}
        changes = {key: limits[key] for key in config.unset_limits}
        if config.model in (None, running.alias):  # transformers serve answers to its folder's name
            changes["model"] = running.served_model
        yield replace(config, base_url=running.base_url, local=False, local_model=None, **changes), running
    finally:
        running.close()
