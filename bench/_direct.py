"""The engine's programs on a fixed batch, without the scheduler: what bench/decode.py and bench/quant_decode.py time
(prefill of B prompts, then decode steps), on the same page pool and programs the engine runs."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qcjax.inference import programs, rows
from qcjax.inference.engine import DEFAULT_PAGE_SIZE
from qcjax.sampling import GREEDY, pow2


class Batch:
    """B prompts of one length, each with room for `new` tokens, in pages of `page_size`; greedy."""

    def __init__(self, cfg, prompts: list[list[int]], new: int, cache_dtype, page_size: int = DEFAULT_PAGE_SIZE):
        self.cfg, self.b, self.new = cfg, len(prompts), new
        length = len(prompts[0])
        self.t = max(16, pow2(length))
        if self.t % page_size:
            raise ValueError(f"page_size {page_size} must divide the prompt bucket {self.t}")
        self.width = -(-max(self.t, length + new) // page_size)
        self.pool_args = dict(num_pages=self.b * self.width, page_size=page_size, dtype=jnp.dtype(cache_dtype))
        self.pages = jnp.arange(self.b * self.width, dtype=jnp.int32).reshape(self.b, self.width)
        toks = np.zeros((self.b, self.t), np.int32)
        toks[:, :length] = prompts
        self.tokens, self.length = jnp.asarray(toks), length
        self.controls = rows.controls([rows.Sequence(rows.Request([0], new), [0], 1)] * self.b, self.b,
                                      lambda x, names: jnp.asarray(x))
        self.kinds = rows.kinds_for([GREEDY], cfg.vocab_size)

    def prefill(self, params):
        """A fresh pool and the prompts prefilled into it (the fresh-prompt program): (pool, first tokens [B])."""
        pool = programs.init_pool(self.cfg, **self.pool_args)
        n = jnp.full((self.b,), self.length, jnp.int32)
        zero = jnp.zeros((self.b,), jnp.int32)
        return programs.prefill(self.cfg, self.kinds, params, pool, self.tokens, zero, n,
                                self.pages[:, : self.t // self.pool_args["page_size"]], zero, self.controls)

    def decode(self, params, pool, first, steps: int, state=None):
        """`steps` decode steps after the prefill (or after `state`, the Rows a previous call returned):
        (pool, tokens [B, steps], rows)."""
        if state is None:
            state = programs.Rows(self.pages, jnp.full((self.b,), self.length, jnp.int32), first,
                                  jnp.ones((self.b,), jnp.int32), jnp.zeros((self.b,), bool))
        return programs.decode(self.cfg, self.kinds, params, pool, state, self.controls, steps=steps)
