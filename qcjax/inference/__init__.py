"""The inference engine: a paged KV cache with a prefix cache, continuous batching that runs only busy rows, and
`generate` for scripts. Every sampling path (infer.py, `python -m qcjax.serve`, `python -m qcjax.eval`,
`python -m qcjax.prefs`) drives this one engine.

- programs.py: the pure jitted programs (prefill a chunk into pages, decode a chunk of steps) and the page pool;
- pages.py: the page allocator and the prefix tree (host side);
- rows.py: the row table: requests, their sampling settings, limits, stops and finish reasons;
- engine.py: the scheduler (admission, chunked prefill, decode, preemption) and its thread;
- speculative.py: draft proposers (prompt lookup, a draft model) for the verify step (speculative decoding);
- metrics.py: Prometheus metrics; generate.py: `generate` for scripts.
"""
from qcjax.inference.engine import Engine, QueueFull
from qcjax.inference.generate import Completion, generate
from qcjax.inference.rows import Request
from qcjax.inference.speculative import Speculation
from qcjax.sampling import GREEDY, SamplingParams

__all__ = ["GREEDY", "Completion", "Engine", "QueueFull", "Request", "SamplingParams", "Speculation", "generate"]
