"""Measuring models: perplexity (ppl.py), KL divergence against a base model (kld.py)."""
