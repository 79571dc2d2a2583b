"""``python -m st_synth.testing --port 8000 --mean-latency 0.2``: serve the fake OpenAI endpoint."""

from st_synth.testing.openai_server import main

main()
