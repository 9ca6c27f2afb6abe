"""Choosing the next token (greedy, or temperature and top-p with a seeded generator) and the
text of the tokens so far (stop strings, streaming)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from longvila_mcore.errors import ConfigError


class Sampler:
    """Greedy with `temperature` 0; else a draw from the softmax of logits / temperature,
    restricted to the fewest most likely tokens whose probabilities reach `top_p`.

    The draw is one uniform number per token from a generator seeded with `seed`, inverted
    through the cumulative probabilities: the same seed gives the same tokens, and logits that
    differ by rounding (another parallel layout) pick the same token but for a draw within that
    rounding of a boundary."""

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0):
        if temperature < 0:
            raise ConfigError(f"--temperature {temperature} must be >= 0 (0: greedy)")
        if not 0 < top_p <= 1:
            raise ConfigError(f"--top-p {top_p} must be in (0, 1] (1: no truncation)")
        self.temperature, self.top_p = temperature, top_p
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> int:
        """The next token from its logits `[V]`."""
        if self.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.detach().double().cpu() / self.temperature, dim=-1)
        probs, order = probs.sort(descending=True, stable=True)
        probs = probs[probs.cumsum(0) - probs < self.top_p]  # the first always stays
        cumulative = probs.cumsum(0)
        u = torch.rand((), generator=self.generator, dtype=torch.float64) * cumulative[-1]
        index = min(int(torch.searchsorted(cumulative, u, right=True)), len(probs) - 1)
        return int(order[index])


class TextStream:
    """The text of the tokens generated so far: cut before the first stop string, and written
    out piece by piece (`write`, rank 0's stdout) as soon as no stop string can still begin in
    it and it ends on a whole character."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        stops: Sequence[str] = (),
        write: Callable[[str], None] | None = None,
    ):
        if any(not stop for stop in stops):
            raise ConfigError("--stop '' would stop before the first token; give non-empty text")
        self.tokenizer, self.stops, self.write = tokenizer, list(stops), write
        self.hold = max((len(stop) for stop in self.stops), default=1) - 1
        self.text, self.written = "", 0

    def push(self, tokens: Sequence[int]) -> bool:
        """Take the tokens so far; True when the text now contains a stop string."""
        text = self.tokenizer.decode(list(tokens), skip_special_tokens=True)
        found = [i for i in (text.find(stop) for stop in self.stops) if i >= 0]
        if found:
            self.text = text[: min(found)]
            return True
        self.text = text
        ready = len(text) - self.hold
        while ready > self.written and text[ready - 1] == "\ufffd":  # a character's first bytes
            ready -= 1
        self._emit(ready)
        return False

    def finish(self) -> str:
        """Write what is left; the final text."""
        self._emit(len(self.text))
        return self.text

    def _emit(self, end: int) -> None:
        if end > self.written:
            if self.write is not None:
                self.write(self.text[self.written : end])
            self.written = end
