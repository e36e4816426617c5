"""Cross-model prompt transfer: a linear map between two models' input-embedding spaces.

A soft prompt lives in its model's input-embedding space. To reuse it on a model with another tokenizer
and width (SmolLM2-135M, 576 -> Gemma-3-270m, 640), fit a map y = x W + b on *anchor* tokens: tokens
whose decoded strings both vocabularies hold (space markers normalised: SentencePiece `▁`, byte-level
BPE `Ġ` and its byte alphabet; special and added tokens skipped). Both sides use the embeddings as the
model sees them (the embedding module's output, so Gemma 3's sqrt(hidden) scale is included).

Candidate maps (all on centered anchors, plus the bias that maps the source mean to the target mean):
  ridge   least squares with ridge penalty lambda * mean(diag(X^T X)), lambda from a small grid (0 = plain
          least squares)
  procrustes  scaled orthogonal map (W W^T = I times one scale): keeps the prompt's geometry
`method="auto"` fits every candidate on a training split of the anchors, picks the best held-out R^2,
then refits the winner on all anchors. The held-out figures (R^2, mean cosine, and the mean cosine around
the target mean, which a shared mean vector cannot inflate) are kept in the stats.

On disk a bridge is a folder: `bridge.safetensors` (weight [src_hidden, dst_hidden], bias [dst_hidden])
and `bridge.json` (method, penalty, anchor count, held-out fit, source/target names), written atomically.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..fileio import atomic_path
from .soft_prompt import SoftPrompt, _embed

log = logging.getLogger(__name__)

WEIGHTS_NAME = "bridge.safetensors"
META_NAME = "bridge.json"
FORMAT_VERSION = 1
RIDGE_GRID = (0.0, 1e-3, 1e-2, 1e-1, 1.0)
METHODS = ("auto", "ridge", "lstsq", "procrustes")
MIN_ANCHORS = 8


# ------------------------------------------------------------------------------------------ anchor tokens
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable character byte-level BPE writes for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTES = _byte_decoder()


def _is_byte_level(vocab: dict[str, int]) -> bool:
    """Byte-level BPE (GPT-2 `Ġ` for a space) rather than SentencePiece (`▁`), judged from the vocabulary."""
    g = sum(1 for t in vocab if t.startswith("Ġ"))
    s = sum(1 for t in vocab if t.startswith("▁"))
    return g > s


def normalise_token(token: str, byte_level: bool) -> str | None:
    """The text a vocabulary entry stands for, or None when it is no plain text (a partial UTF-8 byte
    sequence, a SentencePiece byte-fallback token such as `<0x0A>`)."""
    if byte_level:
        try:
            return bytes(_BYTES[c] for c in token).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            return None
    if token.startswith("<0x") and token.endswith(">") and len(token) == 6:
        return None
    return token.replace("▁", " ")


def token_strings(tokenizer, n_rows: int | None = None) -> dict[str, int]:
    """{normalised string: token id} of a tokenizer's ordinary tokens (special and added tokens skipped;
    ids >= n_rows skipped; a string held by several ids keeps the smallest)."""
    vocab = tokenizer.get_vocab()
    skip = set(getattr(tokenizer, "all_special_ids", []) or [])
    skip |= set((getattr(tokenizer, "added_tokens_decoder", None) or {}).keys())
    byte_level = _is_byte_level(vocab)
    out: dict[str, int] = {}
    for token, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        if i in skip or (n_rows is not None and i >= n_rows):
            continue
        text = normalise_token(token, byte_level)
        if text and text not in out:
            out[text] = i
    return out


def shared_tokens(src_tokenizer, dst_tokenizer, src_rows: int | None = None,
                  dst_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(src_ids, dst_ids, strings) of the tokens both vocabularies share, in the source's id order."""
    src = token_strings(src_tokenizer, src_rows)
    dst = token_strings(dst_tokenizer, dst_rows)
    common = [s for s in src if s in dst]
    return (torch.tensor([src[s] for s in common], dtype=torch.long),
            torch.tensor([dst[s] for s in common], dtype=torch.long), common)


# ------------------------------------------------------------------------------------------ the map
@dataclass
class Bridge:
    """y = x @ weight + bias, from the source's input-embedding space to the target's."""
    weight: torch.Tensor  # [src_hidden, dst_hidden]
    bias: torch.Tensor    # [dst_hidden]
    stats: dict = field(default_factory=dict)

    def __post_init__(self):
        if not (isinstance(self.weight, torch.Tensor) and self.weight.dim() == 2):
            raise ValueError(f"weight: expected a 2-D tensor [src_hidden, dst_hidden], got "
                             f"{tuple(self.weight.shape) if isinstance(self.weight, torch.Tensor) else type(self.weight).__name__}")
        if not (isinstance(self.bias, torch.Tensor) and self.bias.shape == (self.weight.shape[1],)):
            raise ValueError(f"bias: expected shape ({self.weight.shape[1]},), got "
                             f"{tuple(self.bias.shape) if isinstance(self.bias, torch.Tensor) else type(self.bias).__name__}")
        self.weight = self.weight.detach().float().cpu().contiguous()
        self.bias = self.bias.detach().float().cpu().contiguous()

    @property
    def src_hidden(self) -> int:
        return int(self.weight.shape[0])

    @property
    def dst_hidden(self) -> int:
        return int(self.weight.shape[1])

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.src_hidden:
            raise ValueError(f"x: expected last dimension {self.src_hidden} (the bridge's source width), "
                             f"got shape {tuple(x.shape)}")
        return x.float().cpu() @ self.weight + self.bias

    def save(self, path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"{path} exists and is not a folder")
        meta = {"format": "ctp_fast.bridge", "format_version": FORMAT_VERSION, "src_hidden": self.src_hidden,
                "dst_hidden": self.dst_hidden, **self.stats}
        with atomic_path(path, is_dir=True) as tmp:
            save_file({"weight": self.weight, "bias": self.bias}, str(tmp / WEIGHTS_NAME))
            (tmp / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        return path

    @classmethod
    def load(cls, path) -> "Bridge":
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / WEIGHTS_NAME).exists() or not (path / META_NAME).exists():
            raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME} and {META_NAME}: not a saved bridge")
        meta = json.loads((path / META_NAME).read_text())
        if meta.get("format") != "ctp_fast.bridge":
            raise ValueError(f"{path}: {META_NAME} is not a ctp_fast bridge (format {meta.get('format')!r})")
        tensors = load_file(str(path / WEIGHTS_NAME))
        stats = {k: v for k, v in meta.items() if k not in ("format", "format_version", "src_hidden", "dst_hidden")}
        return cls(tensors["weight"], tensors["bias"], stats)


def _solve(x: torch.Tensor, y: torch.Tensor, method: str, penalty: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of one candidate, fitted on centered float64 anchors."""
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    if method == "procrustes":
        u, s, vh = torch.linalg.svd(xc.T @ yc, full_matrices=False)
        scale = s.sum() / (xc * xc).sum()
        w = scale * (u @ vh)
    else:
        gram = xc.T @ xc
        lam = penalty * gram.diagonal().mean()
        w = torch.linalg.lstsq(gram + lam * torch.eye(gram.shape[0], dtype=x.dtype), xc.T @ yc).solution
    return w, my - mx @ w


def _fit_quality(x, y, w, b) -> dict:
    pred = x @ w + b
    r2 = 1.0 - float(((y - pred) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
    cos = float(torch.nn.functional.cosine_similarity(pred, y, dim=1).mean())
    # the same around the target mean (a shared mean vector inflates the plain cosine)
    centered = float(torch.nn.functional.cosine_similarity(pred - y.mean(0), y - y.mean(0), dim=1).mean())
    return {"r2": r2, "cosine": cos, "cosine_centered": centered}


def fit_linear_map(x: torch.Tensor, y: torch.Tensor, method: str = "auto", heldout: float = 0.1,
                   seed: int = 0) -> Bridge:
    """A Bridge from paired rows x [n, d_src] -> y [n, d_dst]. The held-out split (a seeded `heldout`
    fraction of the rows) chooses among the candidates and gives the reported fit; the chosen map is then
    refitted on all rows."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x, y: expected paired 2-D tensors [n, d_src], [n, d_dst], got {tuple(x.shape)}, {tuple(y.shape)}")
    if not 0.0 < heldout < 1.0:
        raise ValueError(f"heldout: expected a fraction in (0, 1), got {heldout!r}")
    n = x.shape[0]
    n_test = max(2, round(n * heldout))
    if n < MIN_ANCHORS or n - n_test < 2:
        raise ValueError(f"anchors: {n} shared tokens, need at least {MIN_ANCHORS} to fit and check a bridge")
    x, y = x.double(), y.double()
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    te, tr = order[:n_test], order[n_test:]
    if method == "auto":
        candidates = [("ridge", p) for p in RIDGE_GRID] + [("procrustes", 0.0)]
    elif method == "procrustes":
        candidates = [("procrustes", 0.0)]
    elif method == "lstsq":
        candidates = [("ridge", 0.0)]
    else:
        candidates = [("ridge", p) for p in RIDGE_GRID if p > 0]
    scores = []
    for m, p in candidates:
        w, b = _solve(x[tr], y[tr], m, p)
        q = _fit_quality(x[te], y[te], w, b)
        scores.append({"method": m, "penalty": p, "heldout_r2": q["r2"], "heldout_cosine": q["cosine"],
                       "heldout_cosine_centered": q["cosine_centered"]})
        log.info("bridge candidate %s penalty %g: held-out R2 %.4f cosine %.4f", m, p, q["r2"], q["cosine"])
    best = max(scores, key=lambda s: s["heldout_r2"])
    w, b = _solve(x, y, best["method"], best["penalty"])
    train = _fit_quality(x, y, w, b)
    stats = {"method": best["method"], "penalty": best["penalty"], "anchors": n, "heldout_anchors": int(n_test),
             "heldout_r2": best["heldout_r2"], "heldout_cosine": best["heldout_cosine"],
             "heldout_cosine_centered": best["heldout_cosine_centered"],
             "train_r2": train["r2"], "train_cosine": train["cosine"], "candidates": scores}
    return Bridge(w, b, stats)


def _rows(model, name: str) -> int:
    if not hasattr(model, "get_input_embeddings") or model.get_input_embeddings() is None:
        raise ValueError(f"{name}: expected a model with input embeddings (get_input_embeddings), "
                         f"got {type(model).__name__}")
    return int(model.get_input_embeddings().weight.shape[0])


def _check_pair(model, tokenizer, side: str) -> int:
    rows = _rows(model, f"{side}_model")
    if not hasattr(tokenizer, "get_vocab"):
        raise ValueError(f"{side}_tokenizer: expected a Hugging Face tokenizer, got {type(tokenizer).__name__}")
    vocab = max(tokenizer.get_vocab().values()) + 1
    base = getattr(tokenizer, "vocab_size", vocab) or vocab
    if base > rows:
        raise ValueError(f"{side}_tokenizer: has {base} tokens but {side}_model's input embedding has {rows} rows: "
                         "not this model's tokenizer")
    return rows


def _name(model) -> str | None:
    return getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)


def fit_bridge(src_model, src_tokenizer, dst_model, dst_tokenizer, method: str = "auto", heldout: float = 0.1,
               seed: int = 0, max_anchors: int | None = None, src_name: str | None = None,
               dst_name: str | None = None) -> Bridge:
    """Fit a Bridge from src_model's input-embedding space to dst_model's on their shared tokens.
    max_anchors: use at most this many (a seeded sample) to save time."""
    src_rows = _check_pair(src_model, src_tokenizer, "src")
    dst_rows = _check_pair(dst_model, dst_tokenizer, "dst")
    src_ids, dst_ids, strings = shared_tokens(src_tokenizer, dst_tokenizer, src_rows, dst_rows)
    if len(strings) < MIN_ANCHORS:
        raise ValueError(f"src_tokenizer, dst_tokenizer: only {len(strings)} shared tokens "
                         f"(need {MIN_ANCHORS}); the two vocabularies have too little in common for a bridge")
    if max_anchors is not None and len(strings) > max_anchors:
        keep = torch.randperm(len(strings), generator=torch.Generator().manual_seed(seed))[:max_anchors].sort().values
        src_ids, dst_ids = src_ids[keep], dst_ids[keep]
    log.info("bridge: %d anchor tokens shared by the two vocabularies", len(src_ids))
    x, y = _embed(src_model, src_ids), _embed(dst_model, dst_ids)
    bridge = fit_linear_map(x, y, method, heldout, seed)
    bridge.stats.update({"source": src_name or _name(src_model), "target": dst_name or _name(dst_model),
                         "shared_tokens": len(strings), "src_token_norm": float(x.norm(dim=1).mean()),
                         "dst_token_norm": float(y.norm(dim=1).mean())})
    return bridge


def bridge_prompt(prompt: SoftPrompt, bridge: Bridge, source_metadata: dict | None = None,
                  norm: str = "map") -> SoftPrompt:
    """The prompt mapped into the bridge's target space. norm: "map" keeps the mapped rows as they are;
    "target" rescales every row to the target's mean anchor-token norm (a least-squares map shrinks or
    inflates what it cannot explain). The result carries `.metadata` (source model, the bridge's stats,
    the source prompt's metadata) for `save_prompt(..., metadata=p.metadata)`."""
    if norm not in ("map", "target"):
        raise ValueError(f"norm: expected 'map' or 'target', got {norm!r}")
    if not isinstance(prompt, SoftPrompt):
        raise ValueError(f"prompt: expected a SoftPrompt, got {type(prompt).__name__}")
    if not isinstance(bridge, Bridge):
        raise ValueError(f"bridge: expected a Bridge, got {type(bridge).__name__}")
    if prompt.hidden != bridge.src_hidden:
        raise ValueError(f"prompt: hidden size {prompt.hidden} does not match the bridge's source width "
                         f"{bridge.src_hidden}")
    mapped = bridge.apply(prompt.embeddings.detach())
    if norm == "target":
        if "dst_token_norm" not in bridge.stats:
            raise ValueError("norm: 'target' needs the target's token norm, which this bridge's stats lack "
                             "(fit it with fit_bridge)")
        mapped = mapped / mapped.norm(dim=1, keepdim=True).clamp_min(1e-12) * bridge.stats["dst_token_norm"]
    out = SoftPrompt(mapped, init="bridged")
    source_metadata = {k: v for k, v in (source_metadata or {}).items() if k != "adapter_config"}
    out.metadata = {"bridged_from": bridge.stats.get("source"), "bridge": dict(bridge.stats, candidates=None),
                    "source_prompt": source_metadata, "source_hidden": prompt.hidden, "norm": norm}
    return out


def same_norm_random(prompt: SoftPrompt, seed: int = 0) -> SoftPrompt:
    """A random prompt (Gaussian directions) with the same per-row norms as `prompt`: a control."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(prompt.embeddings.shape, generator=gen)
    r = r / r.norm(dim=1, keepdim=True) * prompt.embeddings.detach().norm(dim=1, keepdim=True)
    return SoftPrompt(r, init="random")


def prompt_for_model(prompt: SoftPrompt, metadata: dict, model, tokenizer, bridge: str = "auto",
                     load_source=None, cache: dict | None = None) -> tuple[SoftPrompt, Bridge | None]:
    """`prompt` ready for `model`: as is when the widths match, else mapped through a bridge.

    bridge: "none" (refuse a width mismatch), "auto" (fit one from the prompt's source model, named in its
    metadata: `model`, else adapter_config's base_model_name_or_path, loaded with `load_source(name)` ->
    (model, tokenizer)), or the folder of a saved Bridge. `cache` keeps fitted bridges between calls.
    Returns (prompt, the bridge used or None)."""
    from .soft_prompt import embedding_dim

    hidden = embedding_dim(model)
    if prompt.hidden == hidden:
        return prompt, None
    if bridge == "none":
        raise ValueError(f"bridge: the prompt has hidden size {prompt.hidden} and the target {hidden}; "
                         "use --bridge auto or a saved bridge folder")
    target = _name(model) or type(model).__name__
    if bridge == "auto":
        source = metadata.get("model") or (metadata.get("adapter_config") or {}).get("base_model_name_or_path")
        if not source:
            raise ValueError("bridge: auto needs the prompt's source model, but its metadata names none "
                             "(no 'model' in ctp_prompt.json, no base_model_name_or_path); pass a bridge folder")
        if load_source is None:
            raise ValueError("load_source: needed to load the prompt's source model for --bridge auto")
        key = (str(source), str(target))
        if cache is None or key not in cache:
            src_model, src_tok = load_source(str(source))
            fitted = fit_bridge(src_model, src_tok, model, tokenizer, src_name=str(source), dst_name=str(target))
            if cache is not None:
                cache[key] = fitted
        b = fitted if cache is None else cache[key]
    else:
        b = Bridge.load(bridge)
    if b.dst_hidden != hidden:
        raise ValueError(f"bridge: maps into width {b.dst_hidden}, the target's embedding has {hidden}")
    return bridge_prompt(prompt, b, metadata), b
