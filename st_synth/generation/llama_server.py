"""llama-cpp-python's OpenAI-compatible server, its grammar-constrained sampling asked about the best candidates first.

llama-cpp-python 0.3.x samples a grammar-constrained token with the chain ``penalties -> grammar -> top_k ->
typical -> top_p -> min_p -> temp -> dist``: the grammar checks every one of the vocabulary's candidates (49,152
for SmolLM2) before top-k keeps 40 of them. On 2 cores that cost 8.0 ms per JSON token against 0.52 ms for prose,
104 s of the main job's 647 s of generation at commit 0d82415; with this sampler 1.8 ms, 23 s of 595 s
(``benchmarks/results/generation-time.md`` holds the second run).

:class:`TopKGrammarSampler` takes the place of the grammar and gives the chain what grammar and top-k would
have: it orders only the 512 highest-scoring candidates (then 4,096) and asks the grammar about those. Where at least k
of them are allowed, these k are exactly the k best allowed candidates of the whole vocabulary. Where fewer are
(the JSON structure between the strings), and every allowed candidate outside the window scores too low to pass
min-p, the allowed ones inside are all that min-p would leave. Otherwise the grammar checks every candidate, as
before. The sampled token, and so every answer at a given seed, is the same as llama-cpp-python's own
(``tests/test_llama_server.py`` compares them on real answers).

    python -m st_synth.generation.llama_server --model MODEL.gguf ...   (llama_cpp.server's own arguments)
"""

from __future__ import annotations

import contextlib
import ctypes
import inspect
import logging
import math
from collections import Counter
from collections.abc import Iterator

import numpy as np

logger = logging.getLogger(__name__)

WINDOWS = (512, 4096)
"""How many of the highest-scoring candidates the grammar checks first, then next (at least 4 x top-k)."""
CHAIN_AFTER_GRAMMAR = ["top-k", "typical", "top-p", "min-p", "temp", "dist"]
"""llama-cpp-python's chain after the grammar when it samples (not greedy, not mirostat)."""
TOKEN = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data
counts: Counter = Counter()
"""Tokens per route in this process: ``top-k in W`` (k allowed among the W best), ``min-p in W`` (fewer, and
min-p leaves no other), ``vocabulary`` (the grammar over every candidate)."""


class TopKGrammarSampler:
    """A llama.cpp sampler (its C interface, from Python) that applies a grammar, asking it about the
    highest-scoring candidates first where the chain after it allows (:meth:`follow_with`); until then, and
    where it does not, it is the plain grammar."""

    def __init__(self, vocab, grammar: str, root: str, windows: tuple[int, ...] = WINDOWS) -> None:
        from llama_cpp import llama_cpp

        self._lib = llama_cpp
        self.grammar = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), root.encode())
        if not self.grammar:
            raise ValueError("llama.cpp could not parse the grammar")
        self.k = 0
        self.min_p = 0.0
        self.windows = windows
        self._buffer = np.zeros(max(windows), dtype=TOKEN)
        self._callbacks = (  # kept referenced: llama.cpp holds bare pointers to them
            llama_cpp.llama_sampler_i_apply(lambda _, cur_p: self.apply(cur_p)),
            llama_cpp.llama_sampler_i_accept(
                lambda _, token: llama_cpp.llama_sampler_accept(self.grammar, token)
            ),
            llama_cpp.llama_sampler_i_reset(lambda _: llama_cpp.llama_sampler_reset(self.grammar)),
        )
        self._iface = llama_cpp.llama_sampler_i()
        self._iface.apply, self._iface.accept, self._iface.reset = self._callbacks
        self._iface.name = llama_cpp.llama_sampler_i_name(0)
        self._iface.clone = llama_cpp.llama_sampler_i_clone(0)
        self._iface.free = llama_cpp.llama_sampler_i_free(0)  # the chain never frees it: close() does
        self._sampler = llama_cpp.llama_sampler()
        self._sampler.iface = ctypes.pointer(self._iface)
        self._sampler.ctx = None
        self.pointer = ctypes.pointer(self._sampler)

    def follow_with(self, top_k: int, typical_p: float, top_p: float, min_p: float) -> None:
        """The settings of the chain's samplers after this one (:data:`CHAIN_AFTER_GRAMMAR`). Typical and
        top-p below 1 read every candidate's probability, so min-p cannot stand in for the whole vocabulary then."""
        if top_k > 0 and 4 * top_k <= min(self.windows):
            self.k = top_k
            self.min_p = min_p if typical_p >= 1 and top_p >= 1 and 0 < min_p < 1 else 0.0

    def apply(self, cur_p) -> None:
        array = cur_p.contents
        size = array.size
        windows = [window for window in self.windows if window < size] if self.k else []
        if windows:
            data = np.ctypeslib.as_array(
                (ctypes.c_byte * (size * TOKEN.itemsize)).from_address(ctypes.addressof(array.data.contents))
            ).view(TOKEN)
        for window in windows:
            if (keep := self._allowed_in(data, window)) is not None:
                data[: len(keep)] = keep
                array.size = len(keep)
                array.sorted = True
                return
        counts["vocabulary"] += 1
        self._lib.llama_sampler_apply(self.grammar, cur_p)

    def _allowed_in(self, data: np.ndarray, window: int) -> np.ndarray | None:
        """What grammar and top-k (and min-p) keep, sorted, from the ``window`` best candidates; ``None`` where
        a candidate outside the window could be among them."""
        logits = data["logit"]
        top = np.argpartition(logits, len(data) - window)[len(data) - window :]
        buffer = self._buffer[:window]
        buffer[:] = data[top[np.argsort(-logits[top], kind="stable")]]
        floor = float(buffer["logit"][-1])  # no candidate outside the window scores more
        view = self._lib.llama_token_data_array(
            data=buffer.ctypes.data_as(self._lib.llama_token_data_p), size=window, selected=-1, sorted=True
        )
        self._lib.llama_sampler_apply(self.grammar, ctypes.byref(view))
        allowed = np.flatnonzero(np.isfinite(buffer["logit"]))
        if len(allowed) >= self.k:
            counts[f"top-k in {window}"] += 1
            return buffer[allowed[: self.k]].copy()
        # min-p keeps what scores at least the best allowed + log(min_p) (a margin for float32 rounding).
        if len(allowed) and self.min_p and floor < buffer["logit"][allowed[0]] + math.log(self.min_p) - 1e-3:
            counts[f"min-p in {window}"] += 1
            return buffer[allowed].copy()
        return None

    def close(self) -> None:
        if self.grammar:
            self._lib.llama_sampler_free(self.grammar)
            self.grammar = None


@contextlib.contextmanager
def top_k_grammar(windows: tuple[int, ...] = WINDOWS) -> Iterator[None]:
    """Within the block, llama-cpp-python's sampler chains take :class:`TopKGrammarSampler` for the grammar,
    told the settings of the samplers after it where they are :data:`CHAIN_AFTER_GRAMMAR`."""
    from llama_cpp import _internals, llama_cpp
    from llama_cpp.llama import Llama

    chain, add_grammar, init_sampler = (
        _internals.LlamaSampler,
        _internals.LlamaSampler.add_grammar,
        Llama._init_sampler,
    )
    signature = inspect.signature(init_sampler)
    needed = {"top_k", "typical_p", "top_p", "min_p", "grammar"}
    if not needed <= set(signature.parameters) or not all(
        hasattr(llama_cpp, name)
        for name in ("llama_sampler_chain_get", "llama_sampler_name", "llama_sampler_i")
    ):
        logger.warning("This llama-cpp-python samples differently from the 0.3.x this server knows: its own grammar "
                       "sampling is used (slower, the same answers).")  # fmt: skip
        yield
        return

    def grammar_sampler(self, model, grammar) -> None:
        sampler = TopKGrammarSampler(model.vocab, grammar._grammar, grammar._root, windows)
        llama_cpp.llama_sampler_chain_add(self.sampler, sampler.pointer)
        # llama-cpp-python takes these out of the chain before freeing it, so llama.cpp never frees them.
        self.custom_samplers.append((llama_cpp.llama_sampler_chain_n(self.sampler) - 1, sampler))
        self._exit_stack.callback(sampler.close)

    def sampler_chain(self, *args, **kwargs):
        sampler = init_sampler(self, *args, **kwargs)
        settings = signature.bind(self, *args, **kwargs)
        settings.apply_defaults()
        setting = settings.arguments
        for index, custom in sampler.custom_samplers:
            after = range(index + 1, llama_cpp.llama_sampler_chain_n(sampler.sampler))
            names = [
                llama_cpp.llama_sampler_name(llama_cpp.llama_sampler_chain_get(sampler.sampler, i))
                for i in after
            ]
            if (
                isinstance(custom, TopKGrammarSampler)
                and [n.decode().lstrip("?") for n in names] == CHAIN_AFTER_GRAMMAR
            ):
                custom.follow_with(setting["top_k"], setting["typical_p"], setting["top_p"], setting["min_p"])
        return sampler

    chain.add_grammar, Llama._init_sampler = grammar_sampler, sampler_chain
    try:
        yield
    finally:
        chain.add_grammar, Llama._init_sampler = add_grammar, init_sampler


def main() -> None:
    """``python -m llama_cpp.server``, with :func:`top_k_grammar` in force."""
    from llama_cpp.server.__main__ import main as serve

    with top_k_grammar():
        serve()


if __name__ == "__main__":
    main()
