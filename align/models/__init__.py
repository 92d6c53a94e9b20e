"""Model references and loading, the packaged default, tiny test models, generation and log-probs."""
