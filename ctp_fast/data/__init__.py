"""Shipped models and corpora, splits and token windows."""
from .assets import load_model, local_model_dir
from .corpora import CORPORA, corpus_split, load_corpus, split_documents, token_windows

__all__ = ["CORPORA", "corpus_split", "load_corpus", "load_model", "local_model_dir", "split_documents", "token_windows"]
