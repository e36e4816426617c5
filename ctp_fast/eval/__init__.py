"""Evaluation: perplexity (and, with the prompt path, cloze accuracy)."""
from .perplexity import NLL, nll_of_logits, perplexity

__all__ = ["NLL", "nll_of_logits", "perplexity"]
