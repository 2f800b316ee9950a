"""Text and tokens: the offline corpora with fixed calibration / evaluation splits, local text and
hub names (:mod:`.corpora`), calibration and evaluation windows, and the tokenizers
(:mod:`.tokenizer`). ``from lowbit import data; data.corpus_text("brown", "calib")``."""

from lowbit.data.corpora import *  # noqa: F401,F403  (the package is the corpora API)
from lowbit.data.corpora import __all__ as _corpora_all
from lowbit.data.tokenizer import Tokenizer

__all__ = [*_corpora_all, "Tokenizer"]
