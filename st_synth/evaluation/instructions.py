"""Evaluation instructions per MTEB task, after the paper's list (its Table 14 and the e5 evaluation
scripts), plus the shipped offline tasks. Queryable by task name; unknown names get close matches."""

from __future__ import annotations

from st_synth.common.names import unknown_name

STS_INSTRUCTION = "Retrieve semantically similar text."
BITEXT_INSTRUCTION = "Retrieve parallel sentences."

_CQADUPSTACK = (
    "Given a question, retrieve detailed question descriptions from Stackexchange that are duplicates to the "
    "given question"
)

_CQADUPSTACK_FORUMS = (
    "Android", "English", "Gaming", "Gis", "Mathematica", "Physics", "Programmers", "Stats", "Tex", "Unix",
    "Webmasters", "Wordpress",
)  # fmt: skip

INSTRUCTIONS: dict[str, str] = {
    # Classification
    "AmazonCounterfactualClassification": "Classify a given Amazon customer review text as either counterfactual or not-counterfactual",
    "AmazonPolarityClassification": "Classify Amazon reviews into positive or negative sentiment",
    "AmazonReviewsClassification": "Classify the given Amazon review into its appropriate rating category",
    "Banking77Classification": "Given a online banking query, find the corresponding intents",
    "EmotionClassification": "Classify the emotion expressed in the given Twitter message into one of the six emotions: anger, fear, joy, love, sadness, and surprise",
    "ImdbClassification": "Classify the sentiment expressed in the given movie review text from the IMDB dataset",
    "MassiveIntentClassification": "Given a user utterance as query, find the user intents",
    "MassiveScenarioClassification": "Given a user utterance as query, find the user scenarios",
    "MTOPDomainClassification": "Classify the intent domain of the given utterance in task-oriented conversation",
    "MTOPIntentClassification": "Classify the intent of the given utterance in task-oriented conversation",
    "ToxicConversationsClassification": "Classify the given comments as either toxic or not toxic",
    "TweetSentimentExtractionClassification": "Classify the sentiment of a given tweet as either positive, negative, or neutral",
    # Clustering
    "ArxivClusteringP2P": "Identify the main and secondary category of Arxiv papers based on the titles and abstracts",
    "ArxivClusteringS2S": "Identify the main and secondary category of Arxiv papers based on the titles",
    "BiorxivClusteringP2P": "Identify the main category of Biorxiv papers based on the titles and abstracts",
    "BiorxivClusteringS2S": "Identify the main category of Biorxiv papers based on the titles",
    "MedrxivClusteringP2P": "Identify the main category of Medrxiv papers based on the titles and abstracts",
    "MedrxivClusteringS2S": "Identify the main category of Medrxiv papers based on the titles",
    "RedditClustering": "Identify the topic or theme of Reddit posts based on the titles",
    "RedditClusteringP2P": "Identify the topic or theme of Reddit posts based on the titles and posts",
    "StackExchangeClustering": "Identify the topic or theme of StackExchange posts based on the titles",
    "StackExchangeClusteringP2P": "Identify the topic or theme of StackExchange posts based on the given paragraphs",
    "TwentyNewsgroupsClustering": "Identify the topic or theme of the given news articles",
    # Pair classification
    "SprintDuplicateQuestions": "Retrieve duplicate questions from Sprint forum",
    "TwitterSemEval2015": "Retrieve tweets that are semantically similar to the given tweet",
    "TwitterURLCorpus": "Retrieve tweets that are semantically similar to the given tweet",
    # Reranking
    "AskUbuntuDupQuestions": "Retrieve duplicate questions from AskUbuntu forum",
    "MindSmallReranking": "Retrieve relevant news articles based on user browsing history",
    "SciDocsRR": "Given a title of a scientific paper, retrieve the titles of other relevant papers",
    "StackOverflowDupQuestions": "Retrieve duplicate questions from StackOverflow forum",
    # Retrieval
    "ArguAna": "Given a claim, find documents that refute the claim",
    "ClimateFEVER": "Given a claim about climate change, retrieve documents that support or refute the claim",
    "DBPedia": "Given a query, retrieve relevant entity descriptions from DBPedia",
    "FEVER": "Given a claim, retrieve documents that support or refute the claim",
    "FiQA2018": "Given a financial question, retrieve user replies that best answer the question",
    "HotpotQA": "Given a multi-hop question, retrieve documents that can help answer the question",
    "MSMARCO": "Given a web search query, retrieve relevant passages that answer the query",
    "NFCorpus": "Given a question, retrieve relevant documents that best answer the question",
    "NQ": "Given a question, retrieve Wikipedia passages that answer the question",
    # Multilingual Wikipedia retrieval (MIRACL, Mr. TyDi): not in the authors' English lists; NQ's instruction,
    # which describes the same task, rather than the type default.
    **dict.fromkeys(
        ("MIRACLRetrieval", "MIRACLRetrievalHardNegatives", "MIRACLReranking", "MrTidyRetrieval"),
        "Given a question, retrieve Wikipedia passages that answer the question",
    ),
    "QuoraRetrieval": "Given a question, retrieve questions that are semantically equivalent to the given question",
    "SCIDOCS": "Given a scientific paper title, retrieve paper abstracts that are cited by the given paper",
    "SciFact": "Given a scientific claim, retrieve documents that support or refute the claim",
    "Touche2020": "Given a question, retrieve detailed and persuasive arguments that answer the question",
    "TRECCOVID": "Given a query on COVID-19, retrieve documents that answer the query",
    **{f"CQADupstack{forum}Retrieval": _CQADUPSTACK for forum in _CQADUPSTACK_FORUMS},
    # STS and summarization
    **dict.fromkeys(
        ("BIOSSES", "SICK-R", "STS12", "STS13", "STS14", "STS15", "STS16", "STS17", "STS22", "STSBenchmark"),
        STS_INSTRUCTION,
    ),
    "SummEval": "Given a news summary, retrieve other semantically similar summaries",
    # Bitext mining
    "BUCC": BITEXT_INSTRUCTION,
    "Tatoeba": BITEXT_INSTRUCTION,
    # Offline tasks shipped with st_synth (built from files inside PyPI packages)
    "LeeDocSTS": STS_INSTRUCTION,
    "MiniNewsgroupsClassification": "Classify the given newsgroup post into its topic",
    "ChatterbotQARetrieval": "Given a question from a casual conversation, retrieve the reply that answers it",
    "TorchDocsRetrieval": "Given a one-sentence summary of a PyTorch function or class, retrieve its documentation",
}

# When a task has no entry of its own, its type's instruction is a reasonable default.
TYPE_DEFAULTS: dict[str, str] = {
    "STS": STS_INSTRUCTION,
    "BitextMining": BITEXT_INSTRUCTION,
    "Retrieval": "Given a query, retrieve relevant documents that answer the query",
    "Reranking": "Given a query, retrieve relevant documents that answer the query",
    "Classification": "Classify the given text into its category",
    "Clustering": "Identify the topic or theme of the given text",
    "PairClassification": "Retrieve text that is semantically similar to the given text",
    "Summarization": "Given a news summary, retrieve other semantically similar summaries",
}


def has_instruction(task_name: str) -> bool:
    """Whether ``task_name`` has an instruction of its own (not only its type's default)."""
    return task_name in INSTRUCTIONS


def get_instruction(task_name: str, task_type: str | None = None) -> str:
    """The instruction for an MTEB task name; falls back to the task type's default when given."""
    if task_name in INSTRUCTIONS:
        return INSTRUCTIONS[task_name]
    if task_type in TYPE_DEFAULTS:
        return TYPE_DEFAULTS[task_type]
    error = unknown_name("task (no instruction is registered for it)", task_name, INSTRUCTIONS,
                         list_choices=False, extra="Register one with register_instruction(), or pass its "
                         f"task type ({', '.join(TYPE_DEFAULTS)}).")  # fmt: skip
    raise KeyError(str(error))


def register_instruction(task_name: str, instruction: str) -> None:
    """Give the mteb task ``task_name`` the instruction ``instruction`` (what :func:`get_instruction` returns for
    it, over any built-in one); an empty instruction is refused.

    Example::

        register_instruction("MyDomainRetrieval", "Given a support question, retrieve the answer")"""
    if not instruction.strip():
        raise ValueError("An instruction must not be empty.")
    INSTRUCTIONS[task_name] = instruction.strip()
