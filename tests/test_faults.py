"""Fault injection on a training run (bench/faults.py): SIGKILL inside a checkpoint save, SIGKILL at a random step
and SIGTERM, each followed by the same command; the final params equal an uninterrupted run's bit for bit and
metrics.jsonl holds one row per step."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import faults  # noqa: E402


@pytest.mark.slow
def test_seeded_faults_lose_no_data(tmp_path):
    r = faults.run(faults=3, seed=1, steps=14, root=str(tmp_path), log=lambda msg: None)
    assert r["faults"] == 3, r  # each fault fired while the run was still going
    assert r["params_bitwise_equal"] and r["metrics_one_row_per_step"], r
    assert not r["data_lost"] and r["final_rc"] == 0, r["final_stderr"]
