"""Soft prompts: prepend learned embeddings to a (compressed) causal LM, tune them, save them in PEFT's
prompt-tuning layout."""
from .io import adapter_config, load_prompt, save_prompt
from .soft_prompt import (MAX_TOKENS, SoftPrompt, causal_lm_loss, extended_labels, prompted_forward, prompted_inputs,
                          scored_targets)
from .tune import TuneConfig, TuneResult, evaluate, init_prompt, plot_curves, seconds_per_step, tune

__all__ = ["MAX_TOKENS", "SoftPrompt", "TuneConfig", "TuneResult", "adapter_config", "causal_lm_loss", "evaluate",
           "extended_labels", "init_prompt", "load_prompt", "plot_curves", "prompted_forward", "prompted_inputs",
           "save_prompt", "scored_targets", "seconds_per_step", "tune"]
