"""The paper's two-step prompting through any OpenAI-compatible endpoint: plan, prompts, client, answer cache, validation, grounding in a corpus, the Batch API and the local server."""
