"""Jinja templates for the dataset and model cards st-synth writes (shipped as st_synth.model_card_templates)."""
