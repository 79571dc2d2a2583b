"""Dataset and model cards (from the templates in model_card_templates/), their plots, and the Hub."""
