"""The evaluation hook every stage runs, its metrics, pictures and the lm-eval bridge."""
