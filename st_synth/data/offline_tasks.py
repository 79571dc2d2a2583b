"""mteb tasks built only from files that PyPI packages ship, so evaluation runs with no network.

* ``LeeDocSTS``: the 50 news documents of Lee et al. (2005) with human similarity judgements for every
  pair (1,225 pairs, scores 0-1), from gensim's test data (``pip install gensim --no-deps`` is enough).
* ``MiniNewsgroupsClassification``: 200 Usenet posts of 1993 (alt.atheism vs sci.space, 100 each), from
  gensim's test data; header lines are dropped (the ``Newsgroups:`` header names the label) except the
  subject; a fixed stratified half trains the logistic regression, the other half is the test split.
* ``ChatterbotQARetrieval``: English questions from chatterbot-corpus, each to be matched with its reply
  among all the replies of the corpus.

And one domain task, outside the offline benchmark (the main job does not see it):

* ``TorchDocsRetrieval``: the API documentation of the torch release the install pins (``torch==2.13.0``, so
  every machine builds the same task): each public function or class with a docstring of a summary sentence
  and 30+ more words; the summary is the query, the rest of the docstring its document. Natural queries
  nobody here wrote, in a domain no shipped corpus covers; ``benchmarks/bench_domain.py`` trains on the
  documents alone (the GPL protocol) and evaluates on the queries. Every document is in the corpus, but a
  summary that some document repeats (word for word, or a shared 13-word run: the decontamination rule) is no
  query: a model trained on the documents has read it (:func:`torch_doc_queries`).
"""

from __future__ import annotations

import copyreg
import importlib.metadata
import io
import pickle
import re
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mteb.abstasks.classification import AbsTaskClassification
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.sts import AbsTaskSTS
from mteb.abstasks.task_metadata import TaskMetadata

if TYPE_CHECKING:
    from datasets import Dataset

_INSTALL_HINT = "install the eval-data extra: pip install 'st-synth[eval-data]'"


def _package_folder(distribution: str, relative: str, what: str) -> Path:
    """A data folder inside an installed package, or a ValueError that says how to install it."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            f"The offline {what} comes from the {distribution} package; {_INSTALL_HINT}."
        ) from None
    return Path(str(dist.locate_file(relative)))


def gensim_test_data() -> Path:
    return _package_folder("gensim", "gensim/test/test_data", "evaluation data")


def chatterbot_english() -> Path:
    return _package_folder("chatterbot-corpus", "chatterbot_corpus/data/english", "retrieval data")


def _metadata(**fields: Any) -> TaskMetadata:
    common = {
        "dataset": {"path": "st-synth/offline", "revision": "packaged"},
        "category": "t2t", "eval_splits": ["test"], "eval_langs": ["eng-Latn"], "dialect": [],
        "domains": ["News", "Written"], "task_subtypes": [], "license": "not specified",
        "annotations_creators": "human-annotated", "modalities": ["text"], "sample_creation": "found",
    }  # fmt: skip
    return TaskMetadata(**{**common, **fields})


class LeeDocSTS(AbsTaskSTS):
    """STS over the 50 news documents of Lee et al. (2005), shipped with gensim: no network needed."""

    metadata = _metadata(
        name="LeeDocSTS",
        type="STS",
        description="Lee et al. (2005): 50 news documents, human similarity for every pair, from gensim's test data.",
        reference="https://radimrehurek.com/gensim/",
        main_score="cosine_spearman",
        date=("2005-01-01", "2005-12-31"),
        bibtex_citation="@inproceedings{lee2005empirical, title={An empirical evaluation of models of text "
        "document similarity}, author={Lee, Michael D and Pincombe, Brandon and Welsh, Matthew}, "
        "booktitle={Proceedings of the Annual Meeting of the Cognitive Science Society}, year={2005}}",
    )
    min_score = 0
    max_score = 1

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        from datasets import Dataset, DatasetDict

        folder = gensim_test_data()
        documents = (folder / "lee.cor").read_text(encoding="utf-8", errors="replace").strip().split("\n")
        rows = [line.split() for line in (folder / "similarities0-1.txt").read_text().strip().split("\n")]
        if len(documents) != 50 or len(rows) != 50:
            raise ValueError(
                f"Unexpected Lee data in {folder}: {len(documents)} documents, {len(rows)} rows."
            )
        pairs = [(i, j) for i in range(50) for j in range(i + 1, 50)]
        self.dataset = DatasetDict({"test": Dataset.from_dict({
            "sentence1": [documents[i] for i, _ in pairs],
            "sentence2": [documents[j] for _, j in pairs],
            "score": [float(rows[i][j]) for i, j in pairs],
        })})  # fmt: skip
        self.data_loaded = True


def lee_background_pairs() -> Dataset:
    """Real training pairs from a shipped corpus: the 300 news documents of gensim's ``lee_background.cor``
    (none of them is among LeeDocSTS's 50), each cut at a sentence boundary into its first and second
    half: (query, positive) pairs for an unsupervised "same document" objective."""
    from datasets import Dataset

    documents = (gensim_test_data() / "lee_background.cor").read_text(encoding="utf-8", errors="replace")
    queries, positives = [], []
    for document in documents.strip().split("\n"):
        sentences = re.split(r"(?<=[.!?])\s+", document.strip())
        if len(sentences) >= 4:
            half = len(sentences) // 2
            queries.append(" ".join(sentences[:half]))
            positives.append(" ".join(sentences[half:]))
    return Dataset.from_dict({"query": queries, "positive": positives})


_WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_WIKI_SKIPPED_SECTIONS = frozenset({
    "references", "see also", "external links", "notes", "further reading", "bibliography", "sources",
    "footnotes", "citations", "works cited", "gallery", "links",
})  # fmt: skip
_WIKI_LINK_NAMESPACES = re.compile(r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):")


def _drop_nested(text: str, opening: str, closing: str) -> str:
    """``text`` without its (possibly nested) ``opening ... closing`` spans, e.g. wiki templates."""
    kept, depth, start = [], 0, 0
    for match in re.finditer(f"{re.escape(opening)}|{re.escape(closing)}", text):
        if match[0] == opening:
            if depth == 0:
                kept.append(text[start : match.start()])
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                start = match.end()
    if depth == 0:
        kept.append(text[start:])
    return "".join(kept)


def wikitext_to_plain(text: str) -> str:
    """Readable prose from MediaWiki markup: comments, references, templates, tables, files and categories
    dropped; links replaced by their label; bold/italic quotes and HTML tags removed."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = _drop_nested(_drop_nested(text, "{{", "}}"), "{|", "|}")
    while (match := _WIKI_LINK_NAMESPACES.search(text)) is not None:  # [[File:...[[nested]]...]]
        text = text[: match.start()] + _drop_nested(text[match.start() :], "[[", "]]")
    text = re.sub(r"\[\[[^\]|]*\|([^\]]*)\]\]|\[\[([^\]]*)\]\]", lambda m: m[1] or m[2] or "", text)
    text = re.sub(r"\[https?://\S+(?: ([^\]]*))?\]", lambda m: m[1] or "", text)
    return re.sub(r"<[^>]+>|'{2,}", "", text)


def wikipedia_section_pairs(min_words: int = 40) -> Dataset:
    """Real (heading, passage) pairs from the English Wikipedia sample gensim ships (about 100 articles):
    the query is ``"Title"`` for the lead or ``"Title: Section"``, the positive that section's first prose
    paragraph of at least ``min_words`` words; reference-like sections are skipped. About 1,500 pairs, in
    the spirit of the title/passage pairs E5 was pre-trained on. Ordered article by article."""
    import bz2
    import xml.etree.ElementTree as ET

    from datasets import Dataset

    root = ET.fromstring(bz2.decompress((gensim_test_data() / _WIKI_DUMP).read_bytes()))
    ns = {"mw": root.tag.partition("}")[0].lstrip("{")}
    articles: list[list[tuple[str, str]]] = []
    for page in root.iterfind("mw:page", ns):
        title = page.findtext("mw:title", "", ns)
        markup = page.findtext("mw:revision/mw:text", "", ns)
        if page.findtext("mw:ns", "", ns) != "0" or markup.lstrip().upper().startswith("#REDIRECT"):
            continue
        parts = re.split(r"^(={2,})\s*(.*?)\s*\1\s*$", wikitext_to_plain(markup), flags=re.M)
        sections = [("", parts[0])] + [(parts[i + 2], parts[i + 3]) for i in range(0, len(parts) - 1, 3)]
        articles.append([])
        for heading, body in sections:
            if heading.lower() in _WIKI_SKIPPED_SECTIONS:
                continue
            for paragraph in body.split("\n\n"):
                words = paragraph.split()
                if len(words) >= min_words and not paragraph.lstrip().startswith(("*", "#", ":", ";", "|")):
                    articles[-1].append((f"{title}: {heading}" if heading else title, " ".join(words)))
                    break
    # Article by article, in the dump's order: a prefix (``max_examples_per_source``) keeps whole articles,
    # whose sections then meet in batches as each other's hard in-batch negatives.
    pairs = [pair for article in articles for pair in article]
    return Dataset.from_dict({"query": [q for q, _ in pairs], "positive": [p for _, p in pairs]})


class _Bunch(dict):
    """Stands in for scikit-learn's ``Bunch`` (a dict) when reading gensim's pickled newsgroup sample."""


def _numpy_globals() -> dict[tuple[str, str], Any]:
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
            ("numpy.core.multiarray", "_reconstruct"): _reconstruct}  # fmt: skip


class _NewsgroupUnpickler(pickle.Unpickler):
    """Loads only the handful of plain types the file is made of; anything else is refused, so the file
    cannot run code even if it were tampered with."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.allowed = {("copy_reg", "_reconstructor"): copyreg._reconstructor, ("__builtin__", "dict"): dict,
                        ("sklearn.datasets.base", "Bunch"): _Bunch, **_numpy_globals()}  # fmt: skip

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"mini_newsgroup refers to {module}.{name}, which is not allowed")
        return self.allowed[(module, name)]


def read_mini_newsgroups() -> tuple[list[str], list[int], list[str]]:
    """gensim's mini newsgroup sample: (posts, labels, label names); a Python 2 pickle, zlib-compressed."""
    raw = (gensim_test_data() / "mini_newsgroup").read_bytes()
    bunch = _NewsgroupUnpickler(io.BytesIO(zlib.decompress(raw)), encoding="latin1").load()
    posts, labels, names = list(bunch["data"]), [int(x) for x in bunch["target"]], list(bunch["target_names"])
    if len(posts) != len(labels) or not posts:
        raise ValueError(f"Unexpected mini_newsgroup data: {len(posts)} posts, {len(labels)} labels.")
    return posts, labels, names


def strip_news_headers(post: str) -> str:
    """The body of a Usenet post, led by its subject; other header lines (which name the group) go."""
    header, _, body = post.partition("\n\n")
    subject = next((line for line in header.split("\n") if line.startswith("Subject:")), "")
    return f"{subject}\n{body.strip()}".strip()


class MiniNewsgroupsClassification(AbsTaskClassification):
    """Two-class 20 Newsgroups posts shipped with gensim: half fits the classifier, half tests it."""

    metadata = _metadata(
        name="MiniNewsgroupsClassification",
        type="Classification",
        description="200 posts of 20 Newsgroups (alt.atheism vs sci.space) from gensim's test data, headers "
        "dropped except the subject; half trains the classifier, half tests it.",
        reference="http://qwone.com/~jason/20Newsgroups/",
        main_score="accuracy",
        date=("1993-01-01", "1993-12-31"),
        domains=["News", "Written"],
        bibtex_citation="@inproceedings{lang1995newsweeder, title={Newsweeder: Learning to filter netnews}, "
        "author={Lang, Ken}, booktitle={Machine Learning Proceedings 1995}, year={1995}}",
    )
    # Train on the whole train half once: mteb's default (8 per label, 10 draws) is noise on 200 posts.
    samples_per_label = 50
    n_experiments = 1

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        from datasets import Dataset, DatasetDict

        posts, labels, _ = read_mini_newsgroups()
        seen: dict[int, int] = {}
        splits: dict[str, dict[str, list]] = {"train": {"text": [], "label": []},
                                             "test": {"text": [], "label": []}}  # fmt: skip
        for post, label in zip(posts, labels, strict=True):  # alternate per label: a stratified half
            seen[label] = seen.get(label, 0) + 1
            split = splits["train" if seen[label] % 2 else "test"]
            split["text"].append(strip_news_headers(post))
            split["label"].append(label)
        self.dataset = DatasetDict({name: Dataset.from_dict(columns) for name, columns in splits.items()})
        self.data_loaded = True


class ChatterbotQARetrieval(AbsTaskRetrieval):
    """Questions of chatterbot-corpus, each to retrieve its reply among all replies."""

    metadata = _metadata(
        name="ChatterbotQARetrieval",
        type="Retrieval",
        description="English questions of chatterbot-corpus, each matched with its reply among all replies.",
        reference="https://github.com/gunthercox/chatterbot-corpus",
        main_score="ndcg_at_10",
        date=("2017-01-01", "2021-12-31"),
        bibtex_citation="",
    )

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        import yaml
        from datasets import Dataset

        answers: dict[str, str] = {}  # reply text -> doc id (replies repeat across questions)
        queries: dict[str, str] = {}  # question text -> query id
        relevant: dict[str, dict[str, int]] = {}
        for path in sorted(chatterbot_english().glob("*.yml")):
            conversations = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get(
                "conversations"
            ) or []
            for turns in conversations:
                if not isinstance(turns, list) or len(turns) < 2:
                    continue
                question, reply = (str(turn).strip() for turn in turns[:2])
                if not question or not reply or question in queries:
                    continue
                doc_id = answers.setdefault(reply, f"d{len(answers)}")
                queries[question] = f"q{len(queries)}"
                relevant[queries[question]] = {doc_id: 1}
        split = {
            "queries": Dataset.from_dict({"id": list(queries.values()), "text": list(queries)}),
            "corpus": Dataset.from_dict({"id": list(answers.values()), "text": list(answers),
                                         "title": [""] * len(answers)}),
            "relevant_docs": relevant,
            "top_ranked": None,
        }  # fmt: skip
        self.dataset = {"default": {"test": split}}
        self.data_loaded = True


# Modules whose public functions and classes make TorchDocsRetrieval (those present in the installed torch).
TORCH_DOC_MODULES = (
    "torch", "torch.nn", "torch.nn.functional", "torch.nn.init", "torch.nn.utils", "torch.optim",
    "torch.optim.lr_scheduler", "torch.utils.data", "torch.distributions", "torch.linalg", "torch.fft",
    "torch.special", "torch.autograd", "torch.sparse", "torch.masked", "torch.func", "torch.signal.windows",
    "torch.hub", "torch.jit", "torch.export", "torch.amp", "torch.profiler", "torch.random",
)  # fmt: skip
_SIGNATURE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$", re.S)
_ROLE = re.compile(r":\w+:`~?([^`]+)`")


def _plain(text: str) -> str:
    """reST roles and literals as their text, whitespace collapsed."""
    return " ".join(_ROLE.sub(r"\1", text).replace("``", "").split())


def torch_doc_pairs() -> list[tuple[str, str]]:
    """(summary, rest of the docstring) of the installed torch's public API (see the module docstring), in a
    fixed order; each summary and each document once."""
    import importlib
    import inspect
    import warnings

    pairs: dict[str, str] = {}
    documents: set[str] = set()
    seen: set[int] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module_name in TORCH_DOC_MODULES:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            for name in sorted(dir(module)):
                item = getattr(module, name, None) if not name.startswith("_") else None
                if item is None or id(item) in seen or not (inspect.isclass(item) or callable(item)):
                    continue
                if not str(getattr(item, "__module__", None) or module_name).startswith("torch"):
                    continue  # re-exported from elsewhere (typing, ...): not torch's own documentation
                seen.add(id(item))
                paragraphs = [p for p in (inspect.getdoc(item) or "").split("\n\n") if p.strip()]
                if paragraphs and _SIGNATURE.match(paragraphs[0].strip()):
                    paragraphs = paragraphs[1:]  # a C function's docstring starts with its signature
                if len(paragraphs) < 2:
                    continue
                summary, document = _plain(paragraphs[0]), _plain(" ".join(paragraphs[1:]))
                if len(summary.split()) < 4 or len(document.split()) < 30:
                    continue
                if summary in pairs or document in documents:
                    continue
                pairs[summary] = document
                documents.add(document)
    return list(pairs.items())


def torch_doc_queries(pairs: list[tuple[str, str]]) -> list[int]:
    """The numbers of ``pairs`` whose summary no document repeats: none holds it word for word (after
    normalisation) or shares a 13-word run with it (:class:`~st_synth.common.text.TextOverlap`, the
    decontamination rule). Torch's docstrings repeat each other (``torch.nn.CosineSimilarity`` and
    ``torch.nn.functional.cosine_similarity``), so training on the documents would train on such a summary."""
    from st_synth.common.text import TextOverlap, normalize

    documents = [document for _, document in pairs]
    overlap = TextOverlap(documents)
    normal = [normalize(document) for document in documents]
    summaries = ((number, summary, normalize(summary)) for number, (summary, _) in enumerate(pairs))
    return [
        number
        for number, summary, query in summaries
        if overlap.why(summary) is None and not any(query in text for text in normal)
    ]


class TorchDocsRetrieval(AbsTaskRetrieval):
    """The installed torch's API summaries, each to retrieve the rest of its docstring (module docstring)."""

    metadata = _metadata(
        name="TorchDocsRetrieval",
        type="Retrieval",
        description="Summary sentences of the public torch API's docstrings, each matched with the rest of its "
        "docstring among all of them (torch as installed: 2.13.0 with st-synth's install); summaries that a "
        "document repeats are left out.",
        reference="https://pytorch.org/docs/",
        main_score="ndcg_at_10",
        date=("2016-01-01", "2026-12-31"),
        bibtex_citation="",
        domains=["Programming", "Written"],
    )

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        from datasets import Dataset

        pairs = torch_doc_pairs()
        queries = torch_doc_queries(pairs)
        split = {
            "queries": Dataset.from_dict({"id": [f"q{i}" for i in queries], "text": [pairs[i][0] for i in queries]}),
            "corpus": Dataset.from_dict({"id": [f"d{i}" for i in range(len(pairs))], "text": [d for _, d in pairs],
                                         "title": [""] * len(pairs)}),
            "relevant_docs": {f"q{i}": {f"d{i}": 1} for i in queries},
            "top_ranked": None,
        }  # fmt: skip
        self.dataset = {"default": {"test": split}}
        self.data_loaded = True


# Domain tasks: resolvable by name (st-synth evaluate --tasks), not part of the offline benchmark.
DOMAIN_TASKS: dict[str, type] = {"TorchDocsRetrieval": TorchDocsRetrieval}

OFFLINE_TASKS: dict[str, type] = {
    "LeeDocSTS": LeeDocSTS,
    "MiniNewsgroupsClassification": MiniNewsgroupsClassification,
    "ChatterbotQARetrieval": ChatterbotQARetrieval,
}
