"""mteb evaluation with per-task instructions, and the texts of evaluation sets that training must never see."""
