"""An OpenAI-compatible completion server on the sampler: `python -m qcjax.serve --hf_dir DIR` (docs/serving.md).

engine.py: continuous batching over one KV cache (the sampler's prefill/decode, no second forward); api.py: the HTTP
API (FastAPI), requests checked into jobs, FIM and chat prompts from qcjax.prompts; __main__.py: the CLI.
"""
