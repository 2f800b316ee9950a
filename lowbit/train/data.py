"""Training data: packed token windows in a deterministic, seed-defined order.

::

    train_tokens, eval_tokens = corpus_tokens("brown", "calib", tok), corpus_tokens("brown", "eval", tok)
    data = TokenWindows(train_tokens, seqlen=256, batch_size=8, seed=0)
    batch = data.batch(step)                     # int32 (8, 256), a pure function of (seed, step)

**Packing.** A corpus split is one token stream (:func:`lowbit.data.corpus_text` joins its
documents, the tokenizer encodes it in one go, no BOS/EOS inserted); it is cut into the
``n = len // seqlen`` non-overlapping windows of :func:`lowbit.data.eval_windows` (the tail shorter
than a window is dropped). Every window is full: no padding, no mask needed.

**Order.** Epoch ``e`` visits all ``n`` windows once in the order
``numpy.random.default_rng(seed + e).permutation(n)``; the windows of micro-step ``s`` are the
global positions ``s * batch_size ... (s + 1) * batch_size - 1`` of the concatenated epochs
(position ``i`` is window ``perm_{i // n}[i % n]``), so a batch may straddle two epochs and no
window is dropped at an epoch's end. The data position of a run is thus the plain integer ``s``:
a resumed run recomputes the same batches from it, nothing else needs saving.

**Splits.** Train on one fixed split of a corpus and evaluate on another (``"calib"`` / ``"eval"``,
see :mod:`lowbit.data.corpora`): they share no line of text, so no training window is an
evaluation window. :func:`train_eval_tokens` refuses ``"all"`` and equal splits.
"""

from __future__ import annotations

import hashlib

import numpy as np

from lowbit.core.checks import is_int
from lowbit.data.corpora import SPLITS, corpus_text, eval_windows

__all__ = ["TokenWindows", "corpus_tokens", "train_eval_tokens"]


def _positive_int(name: str, v) -> int:
    if not is_int(v) or v < 1:
        raise ValueError(f"{name}={v!r}: expected a positive int")
    return int(v)


class TokenWindows:
    """Non-overlapping windows of a token stream, served in batches in a seed-defined order.

    Args:
      tokens: 1-D integer token stream (or pre-cut windows ``(n, seqlen)``).
      seqlen: tokens per window (>= 2: one token predicts the next).
      batch_size: windows per batch (at most the number of windows).
      seed: defines the permutation of every epoch (see the module docstring).
    """

    def __init__(self, tokens, seqlen: int, batch_size: int, seed: int = 0):
        seqlen = _positive_int("seqlen", seqlen)
        if seqlen < 2:
            raise ValueError(f"seqlen={seqlen}: expected >= 2 (one token predicts the next)")
        self.batch_size = _positive_int("batch_size", batch_size)
        if not is_int(seed) or seed < 0:
            raise ValueError(f"seed={seed!r}: expected an int >= 0")
        self.seed, self.seqlen = int(seed), seqlen
        toks = np.asarray(tokens)
        if toks.ndim == 2:
            if toks.shape[1] != seqlen:
                raise ValueError(f"tokens: windows of length {toks.shape[1]}, expected seqlen={seqlen}")
            self.windows = np.ascontiguousarray(toks, dtype=np.int32)
        else:
            self.windows = eval_windows(toks, seqlen)
        if self.windows.shape[0] < self.batch_size:
            raise ValueError(f"batch_size={self.batch_size} exceeds the {self.windows.shape[0]} windows of "
                             f"{seqlen} tokens in the data ({self.windows.size} tokens): use more text, a smaller "
                             "batch_size or a shorter seqlen")
        self._perms: dict[int, np.ndarray] = {}

    @property
    def n_windows(self) -> int:
        return int(self.windows.shape[0])

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seqlen

    def permutation(self, epoch: int) -> np.ndarray:
        """The window order of ``epoch``: ``default_rng(seed + epoch).permutation(n_windows)``."""
        p = self._perms.get(epoch)
        if p is None:
            p = np.random.default_rng(self.seed + int(epoch)).permutation(self.n_windows)
            if len(self._perms) >= 4:       # a run only ever needs the current and the next epoch
                self._perms.pop(min(self._perms))
            self._perms[epoch] = p
        return p

    def indices(self, step: int) -> np.ndarray:
        """Window indices ``(batch_size,)`` of micro-step ``step`` (>= 0)."""
        if not is_int(step) or step < 0:
            raise ValueError(f"step={step!r}: expected an int >= 0")
        pos = int(step) * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        epochs, within = pos // self.n_windows, pos % self.n_windows
        out = np.empty(self.batch_size, dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.permutation(int(e))[within[sel]]
        return out

    def batch(self, step: int) -> np.ndarray:
        """int32 ``(batch_size, seqlen)``: the windows of micro-step ``step``."""
        return self.windows[self.indices(step)]

    def in_order(self, max_batches: int | None = None):
        """Batches of consecutive windows from the first (no shuffling), e.g. for evaluation; the
        windows that do not fill a last batch are left out."""
        n = self.n_windows // self.batch_size
        if max_batches is not None:
            n = min(n, _positive_int("max_batches", max_batches))
        for i in range(n):
            yield self.windows[i * self.batch_size:(i + 1) * self.batch_size]

    def shared_windows(self, other: "TokenWindows") -> int:
        """How many of these windows also occur (token for token) among ``other``'s windows."""
        if other.seqlen != self.seqlen:
            return 0
        seen = {hashlib.blake2b(w.tobytes(), digest_size=16).digest() for w in other.windows}
        return sum(hashlib.blake2b(w.tobytes(), digest_size=16).digest() in seen for w in self.windows)

    def fingerprint(self) -> dict:
        """What identifies the data of a run: window count, length and a SHA-256 of the windows."""
        return {"n_windows": self.n_windows, "seqlen": self.seqlen, "batch_size": self.batch_size,
                "seed": self.seed, "sha256": hashlib.sha256(self.windows.tobytes()).hexdigest()}

    def __repr__(self):
        return (f"TokenWindows({self.n_windows} windows x {self.seqlen} tokens, batch_size={self.batch_size}, "
                f"seed={self.seed})")


def corpus_tokens(name_or_path: str, split: str, tokenizer) -> np.ndarray:
    """The token stream (int32) of a corpus split: ``tokenizer.encode(lowbit.data.corpus_text(...))``.
    ``name_or_path``: any corpus lowbit reads (Brown, Austen, local text files, HF names)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    return np.asarray(tokenizer.encode(corpus_text(name_or_path, split)), dtype=np.int32)


def train_eval_tokens(name_or_path: str, tokenizer, train_split: str = "calib",
                      eval_split: str = "eval") -> tuple[np.ndarray, np.ndarray]:
    """Token streams of two disjoint splits of one corpus (train, eval)."""
    if "all" in (train_split, eval_split) or train_split == eval_split:
        raise ValueError(f"train_split={train_split!r}, eval_split={eval_split!r}: training and evaluation "
                         "need two different fixed splits ('calib' and 'eval'), never 'all', so they never overlap")
    return corpus_tokens(name_or_path, train_split, tokenizer), corpus_tokens(name_or_path, eval_split, tokenizer)
