"""Running recipes: the plan (all checks, no weights), the run, budgets, memory, logs and the report."""
