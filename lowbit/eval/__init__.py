"""Evaluation: perplexity and bits per byte with the GPTQ protocol, logit KL between two models
(:mod:`.likelihood`), and sampling / self-generated calibration text (:mod:`.generate`)."""

from lowbit.eval.likelihood import DEFAULT_SEQLEN, compare_logits, make_windows, perplexity, window_nll

__all__ = ["perplexity", "window_nll", "make_windows", "compare_logits", "DEFAULT_SEQLEN"]
