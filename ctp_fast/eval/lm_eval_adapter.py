"""An lm-evaluation-harness (0.4.x) model: a (compressed or dense) Hugging Face causal LM with an optional
soft prompt before every request, registered as `ctp`.

    pip install -e .[lm-eval]
    import ctp_fast.eval.lm_eval_adapter  # registers "ctp"
    lm_eval.simple_evaluate(model="ctp", model_args="pretrained=runs/gptq4,prompt=runs/prompt/best", tasks=[...])
    # or build it from objects: CTPLM(model=model, tokenizer=tok, prompt=soft_prompt)

Scoring: the prompt's logit positions are trimmed before scoring (never scored); on the shared-prefix path
there are none (`SoftPrompt.logits` returns (logits, n_prefix)). A request longer than the context window
keeps its last `max_length` tokens. Gemma-type models get BOS at the start of every request (they need it),
others not, unless `add_bos_token` says otherwise. generate_until is greedy, stops at EOS, at any `until`
string (cut from the text) or after `max_gen_toks` tokens.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without the optional dependency
    raise ImportError("lm-evaluation-harness is not installed: pip install -e .[lm-eval] "
                      "(or pip install lm-eval)") from e

from ..prompt import SoftPrompt, load_prompt

log = logging.getLogger(__name__)


def _bool(value) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes"):
        return True
    if str(value).lower() in ("0", "false", "no"):
        return False
    raise ValueError(f"add_bos_token: expected true or false, got {value!r}")


@register_model("ctp", "ctp_fast")
class CTPLM(TemplateLM):
    """pretrained: a compressed checkpoint, shipped model name or local HF directory (or pass model= and
    tokenizer= objects); prompt: a SoftPrompt or a saved prompt folder (PEFT layout), or None."""

    def __init__(self, pretrained: str | None = None, model=None, tokenizer=None, prompt=None,
                 batch_size: int | str = 1, max_length: int | None = None, max_gen_toks: int = 256,
                 add_bos_token: bool | str | None = None, **kwargs):
        super().__init__()
        if kwargs:
            log.warning("ctp model: ignoring unknown arguments %s", sorted(kwargs))
        if model is None:
            if not pretrained:
                raise ValueError("pretrained: expected a checkpoint, shipped model name or HF directory "
                                 "(or pass model= and tokenizer=)")
            from ..cli import _load_any

            model, tokenizer = _load_any(str(pretrained))
        elif tokenizer is None:
            raise ValueError("tokenizer: required with model=")
        if isinstance(prompt, str) and prompt:
            prompt = load_prompt(prompt)[0]
        if prompt is not None and not isinstance(prompt, SoftPrompt):
            raise ValueError(f"prompt: expected a SoftPrompt or a saved prompt folder, got {type(prompt).__name__}")
        self.model, self.tokenizer, self.prompt = model.eval(), tokenizer, prompt or None
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 1
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        n_prompt = self.prompt.n_tokens if self.prompt is not None else 0
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        self._max_length = int(max_length) if max_length else min(limit, 2048) - n_prompt
        self.max_gen_toks = int(max_gen_toks)
        add_bos = _bool(add_bos_token)
        self.add_bos_token = ("gemma" in type(model).__name__.lower()) if add_bos is None else add_bos
        if self.add_bos_token and tokenizer.bos_token_id is None:
            raise ValueError("add_bos_token: the tokenizer has no BOS token")

    # ------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_token_id if self.add_bos_token else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "ctp")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.tokenizer(string, add_special_tokens=False)["input_ids"]
        bos = self.add_bos_token if add_special_tokens is None else (add_special_tokens and self.add_bos_token)
        if bos and (not ids or ids[0] != self.tokenizer.bos_token_id):
            ids = [self.tokenizer.bos_token_id] + ids
        return ids

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ------------------------------------------------------------------ model calls
    @torch.no_grad()
    def text_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, L, vocab] over the text positions only (prompt positions trimmed)."""
        device = self.model.get_input_embeddings().weight.device
        input_ids = input_ids.to(device)
        if self.prompt is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
        logits, n_prefix = self.prompt.logits(self.model, input_ids, attention_mask)
        return logits[:, n_prefix:].float()

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context_ids, continuation_ids). Each row is context +
        continuation (minus its last token), cut to the last max_length tokens, right-padded in a batch."""
        out = []
        for i in tqdm(range(0, len(requests), self.batch_size), desc="ctp loglikelihood", disable=disable_tqdm):
            chunk = requests[i:i + self.batch_size]
            rows, conts = [], []
            for _, ctx, cont in chunk:
                if not cont:
                    raise ValueError("continuation: tokenizes to no tokens; nothing to score")
                rows.append((ctx + cont)[-(self.max_length + 1):][:-1])
                conts.append(cont)
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), self.eot_token_id or 0, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, r in enumerate(rows):
                ids[j, :len(r)] = torch.tensor(r)
                mask[j, :len(r)] = 1
            logprobs = F.log_softmax(self.text_logits(ids, mask if len(rows) > 1 else None), dim=-1)
            for j, (r, cont) in enumerate(zip(rows, conts)):
                lp = logprobs[j, len(r) - len(cont):len(r)]  # position t predicts token t + 1
                target = torch.tensor(cont, device=lp.device)
                greedy = bool((lp.argmax(-1) == target).all())
                out.append((float(lp.gather(-1, target[:, None]).sum()), greedy))
                if chunk[j][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", chunk[j][0], out[-1])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document scored separately in disjoint windows of max_length tokens, the first predicted
        from prefix_token_id (BOS or EOS), every token once."""
        out = []
        for req in tqdm(requests, desc="ctp loglikelihood_rolling", disable=disable_tqdm):
            (string,) = req.args
            tokens = self.tok_encode(string, add_special_tokens=False)
            windows = [(None, ctx, cont) for ctx, cont in map(lm_utils.make_disjoint_window,
                       lm_utils.get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1))]
            total = sum(lp for lp, _ in self._loglikelihood_tokens(windows, disable_tqdm=True))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in tqdm(requests, desc="ctp generate_until", disable=disable_tqdm):
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            if gen_kwargs.get("do_sample") or (gen_kwargs.get("temperature") or 0) > 0:
                log.warning("ctp generate_until: sampling requested (%s); generating greedily", gen_kwargs)
            out.append(self.greedy(context, until, max_new))
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), out[-1])
        return out

    def greedy(self, context: str, until: list[str] = (), max_new_tokens: int = 256) -> str:
        """Greedy continuation of `context`, cut at the first stop string (the logits of the whole row are
        recomputed per token: simple, and the prompt path stays the one scoring uses)."""
        ids = self.tok_encode(context)[-self.max_length:]
        new: list[int] = []
        text = ""
        for _ in range(max_new_tokens):
            row = (ids + new)[-self.max_length:]
            nxt = int(self.text_logits(torch.tensor([row]))[0, -1].argmax())
            if nxt == self.eot_token_id:
                break
            new.append(nxt)
            text = self.tok_decode(new)
            if any(s in text for s in until):
                break
        for s in until:
            text = text.split(s)[0] if s else text
        return text
