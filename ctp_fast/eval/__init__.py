"""Evaluation: perplexity (prompt positions never counted) and last-word cloze accuracy."""
from .cloze import ClozeExample, cloze_accuracy, cloze_examples
from .perplexity import NLL, gap_recovered, perplexity

__all__ = ["NLL", "ClozeExample", "cloze_accuracy", "cloze_examples", "gap_recovered", "perplexity"]
