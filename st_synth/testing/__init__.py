"""Test helpers that users of st_synth can reuse: a local OpenAI-compatible server with fault injection."""

from st_synth.testing.openai_server import FakeOpenAIServer

__all__ = ["FakeOpenAIServer"]
