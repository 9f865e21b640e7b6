"""Preference pairs from execution feedback (Qwen2.5-Coder's code DPO): sample K completions per problem, run each
against the problem's tests in the evaluation sandbox (qcjax.eval), pair passing with failing completions of the same
prompt for DPO, and loop sample -> pairs -> DPO (`python -m qcjax.prefs`, docs/eval.md).

- tasks.py: a procedurally generated problem family (seeded templates; train / held-out splits sharing no instance)
- pairs.py: pure pair making from the sandbox's records
- stats.py: pass@1 with bootstrap intervals, paired before/after differences
- cli.py: the command (one pass, or --rounds with DPO training through qcjax.train.loop)
"""
