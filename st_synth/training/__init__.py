"""The SentenceTransformerTrainer recipe: arguments, losses, batch samplers, speed options and the trainer."""
