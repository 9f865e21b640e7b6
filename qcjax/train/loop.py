"""The training loop (the imperative shell): config -> mesh, state, data -> jitted steps -> metrics, checkpoints.

Everything here reads the run config as the typed, checked `qcjax.train.config.TrainConfig` (`c` below) that
`from_config` parses once at the edge (train.py; `train` parses a ConfigDict it is given). What needs the model or
the devices is checked by `validate`; the ConfigDict form of the config (the checkpoints' "train" record, compared
on resume) is derived from it in one place, `run_record`.

One process per host: every process runs this same function; batches are built per process and assembled into
global arrays; process 0 writes metrics. Resuming is automatic from the latest complete checkpoint in the run
directory (an unreadable or half-written step is reported and the previous one is used).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from qcjax import adapters, paths
from qcjax.config import NO_ADAPTATION, Adaptation, LoraSpec, ModelConfig, get_config
from qcjax.model import abstract_params, init_params
from qcjax.sharding import logical_to_spec, make_mesh, param_shardings
from qcjax.train import metrics as mt
from qcjax.train.config import ConfigError, TrainConfig, from_config, to_config_dict
from qcjax.train.step import StepConfig, init_state, lr_schedule, make_eval_step, make_optimizer, make_train_step

log = logging.getLogger("qcjax.train")


class RunError(RuntimeError):
    """A run that cannot go on as asked (a corrupt run directory, a workdir in use, ...); the message says what to
    do. train.py prints it as one line and exits 2."""


# ---- config -> model / optimizer / step configs ------------------------------------------------------------------
# The run config is a qcjax.train.config.TrainConfig, parsed and checked by `from_config` (unknown fields, wrong
# types, values outside a field's choices or limits: ConfigErrors naming the field) before it reaches this module.
def _layer_list(spec: str, n_layers: int) -> tuple[int, ...] | None:
    """"0-11,20" -> (0, ..., 11, 20); "" -> None (all layers)."""
    if not spec.strip():
        return None
    out: list[int] = []
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            out.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ConfigError(f"lora.layers={spec!r}: expected indices and ranges like '0-11,20'") from None
    bad = sorted({i for i in out if not 0 <= i < n_layers})
    if bad:
        raise ConfigError(f"lora.layers={spec!r}: layers {bad} outside 0..{n_layers - 1} (the model has {n_layers})")
    return tuple(sorted(set(out)))


def run_adaptation(tc: TrainConfig, cfg: ModelConfig) -> Adaptation:
    """How the run adapts the model (LoRA adapters, a quantized base) from the run config's lora block; nothing for
    a full-weight run. Kept apart from the model config: the model never sees it (qcjax.adapters applies it)."""
    n_layers = cfg.num_layers
    lo = tc.lora  # (rank >= 0, and base_quant only with adapters: the schema's checks)
    if lo.rank == 0:
        return NO_ADAPTATION
    targets = tuple(t.strip() for t in lo.targets.split(",") if t.strip())
    try:
        spec = LoraSpec(rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout, targets=targets,
                        layers=_layer_list(lo.layers, n_layers))
    except ValueError as e:
        raise ConfigError(str(e).replace("LoraSpec.", "lora.")) from None
    return Adaptation(lora=spec, quant=lo.base_quant)


def model_config(tc: TrainConfig, vocab_hint: int | None = None) -> ModelConfig:
    """The model config: from the init checkpoint when there is one, else the preset; then run-time fields. (A LoRA
    run's adapters are `run_adaptation`'s, not the model's.)"""
    m = tc.model
    run = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, attention_impl=m.attention_impl)
    if tc.init_from:
        from qcjax.loader import load_config

        cfg = load_config(tc.init_from)  # a LoRA checkpoint: its model, which loads merged
        for name in ("num_layers", "vocab_size"):  # the checkpoint decides the shapes; a different ask is an error
            if getattr(m, name) and getattr(m, name) != getattr(cfg, name):
                raise ConfigError(f"model.{name}={getattr(m, name)} conflicts with init_from={tc.init_from} "
                                  f"({name}={getattr(cfg, name)}): drop the override, or start without init_from")
        return cfg.replace(**run)
    shape = {}
    if m.num_layers:
        shape["num_layers"] = m.num_layers
    if m.vocab_size:
        shape["vocab_size"] = m.vocab_size
    elif vocab_hint and m.preset in ("tiny", "small"):
        shape["vocab_size"] = -(-vocab_hint // 128) * 128
    cfg = get_config(m.preset, **shape, **run)
    if m.yarn_factor:
        cfg = cfg.with_yarn(factor=m.yarn_factor)
    return cfg


def grad_accum_for(c: TrainConfig, mesh) -> int:
    """Micro-batches per step. per_device_batch > 0 fixes the rows each device runs at once (what decides memory,
    so a config fits any slice where it fits the smallest): grad_accum = batch_size / (data x fsdp x rows). (That
    per_device_batch and grad_accum are not both set is the schema's check.)"""
    if not c.per_device_batch:
        return c.grad_accum
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if c.batch_size % (dp * c.per_device_batch):
        raise ConfigError(f"batch_size={c.batch_size} is not divisible by per_device_batch={c.per_device_batch} x "
                          f"the data-parallel size data x fsdp = {dp}: change batch_size or per_device_batch, or "
                          "set per_device_batch=0 and grad_accum")
    return c.batch_size // (dp * c.per_device_batch)


def validate(c: TrainConfig, cfg: ModelConfig, n_processes: int = 1, devices=None):
    """What can be wrong with a checked run config (`from_config`: its own fields) on this model and these
    devices, checked before compiling: the mesh, divisibility of the batch by the data-parallel size, the
    micro-batches and the processes, seq_len by mesh.context and against the model's positions. Returns the mesh
    (over `devices`, default all of them)."""
    try:
        mesh = make_mesh(dataclasses.asdict(c.mesh), devices=devices)
    except ValueError as e:
        raise ConfigError(f"mesh: {e}") from None
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    accum = grad_accum_for(c, mesh)
    if (c.batch_size // accum) % dp:
        raise ConfigError(f"batch_size={c.batch_size} (per micro-batch {c.batch_size // accum}) is not "
                          f"divisible by the data-parallel size data x fsdp = {dp}")
    if c.batch_size % n_processes:
        raise ConfigError(f"batch_size={c.batch_size} is not divisible by the {n_processes} processes")
    if c.seq_len % mesh.shape["context"]:
        raise ConfigError(f"seq_len={c.seq_len} is not divisible by mesh.context={mesh.shape['context']}")
    if c.seq_len > cfg.max_position_embeddings:
        raise ConfigError(
            f"seq_len={c.seq_len} exceeds the model's max_position_embeddings={cfg.max_position_embeddings}"
            + ("" if cfg.rope_scaling else "; set model.yarn_factor (e.g. 4.0) for longer contexts"))
    return mesh


# ---- shardings ----------------------------------------------------------------------------------------------------
def opt_state_shardings(abstract_opt: Any, p_shard: Any, mesh) -> Any:
    """Optimizer-state leaves that mirror a param (Adam's mu, nu) take its sharding; counters are replicated."""
    by_path = {tuple(k.key for k in path): s for path, s in jax.tree_util.tree_leaves_with_path(p_shard)}

    def leaf(path, x):
        keys = tuple(getattr(k, "key", None) for k in path)
        for i in range(len(keys)):
            if None not in keys[i:] and keys[i:] in by_path:
                return by_path[keys[i:]]
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(leaf, abstract_opt)


def batch_sharding(mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("act_batch",) + (None,) * (ndim - 1), None, mesh))


# ---- the step the loop runs ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """The jitted train step with its shardings, built once for the loop and for ahead-of-time compiles
    (qcjax.tpu_compile), so that what is compiled for a TPU slice is what the loop runs."""

    mesh: Any
    tx: Any  # the optax transformation
    grad_accum: int
    step_fn: Any  # jit(step, donated state, out_shardings): (state, batch, ref_params, base_params) -> (state, metrics)
    abstract_params: Any  # unboxed ShapeDtypeStructs of the trained params (LoRA: the adapters)
    param_shardings: Any
    opt_shardings: Any
    state_shardings: dict
    base_abstract: Any = None  # LoRA: the frozen base (quantized under QLoRA), unboxed ShapeDtypeStructs
    base_shardings: Any = None
    adaptation: Adaptation = NO_ADAPTATION  # how the step adapts the model (run_adaptation)

    def abstract_base_params(self) -> Any:
        """The frozen base of a LoRA run as sharded ShapeDtypeStructs (None without adapters)."""
        if self.base_abstract is None:
            return None
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.base_abstract,
                            self.base_shardings)

    def abstract_state(self) -> dict:
        """The train state as sharded ShapeDtypeStructs (what `init_state` makes, without memory)."""
        state = jax.eval_shape(lambda p: init_state(p, self.tx), self.abstract_params)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state,
                            self.state_shardings)

    def abstract_ref_params(self, c: TrainConfig) -> Any:
        """The frozen DPO / RL-KL reference (a copy of the params) or None, as the loop passes it."""
        if not _frozen_reference(c) or self.base_abstract is not None:
            return None  # (LoRA: the reference is the base itself)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract_params,
                            self.param_shardings)

    def abstract_batch(self, c: TrainConfig) -> dict:
        """One global batch as the data pipeline yields it, sharded as `to_global` places it."""
        from qcjax.data.pipeline import batch_shapes

        shapes = batch_shapes(c.task, c.batch_size, c.seq_len, ref_logps=c.data.dpo_ref_logps)
        return {k: jax.ShapeDtypeStruct(shape, dt, sharding=batch_sharding(self.mesh, len(shape)))
                for k, (shape, dt) in shapes.items()}


def build_train_program(tc: TrainConfig, cfg: ModelConfig, mesh) -> TrainProgram:
    """The optimizer, shardings and jitted step for a validated config on `mesh` (call under jax.set_mesh)."""
    oc, accum = tc.optimizer, grad_accum_for(tc, mesh)
    tx = make_optimizer(oc, tc.steps)
    ad = run_adaptation(tc, cfg)
    boxed = adapters.abstract_params(cfg, ad)
    p_shard = param_shardings(boxed, mesh)
    abstract_p = nn.meta.unbox(boxed)
    base_abstract = base_shard = None
    if ad.lora is not None:  # train the adapters; the base is a frozen argument
        (base_abstract, abstract_p), (base_shard, p_shard) = adapters.split(abstract_p), adapters.split(p_shard)
        base_abstract = jax.eval_shape(lambda b: adapters.freeze_base(cfg, b, ad.quant), base_abstract)
    o_shard = opt_state_shardings(jax.eval_shape(tx.init, abstract_p), p_shard, mesh)
    state_shard = {"step": NamedSharding(mesh, P()), "params": p_shard, "opt_state": o_shard}
    train_step = make_train_step(cfg, StepConfig.of(tc, accum), tx, lr_schedule(oc, tc.steps), ad)
    step_fn = jax.jit(train_step, donate_argnums=0, out_shardings=(state_shard, None))
    return TrainProgram(mesh=mesh, tx=tx, grad_accum=accum, step_fn=step_fn, abstract_params=abstract_p,
                        param_shardings=p_shard, opt_shardings=o_shard, state_shardings=state_shard,
                        base_abstract=base_abstract, base_shardings=base_shard, adaptation=ad)


# ---- tokenizer and data ---------------------------------------------------------------------------------------------
def setup_tokenizer(c: TrainConfig, workdir: str):
    """The run's tokenizer; "spm:stdlib:VOCAB" trains a small SentencePiece model on the stdlib once per run
    directory (process 0 trains, the others wait for the file)."""
    from qcjax.data.spm import train_spm
    from qcjax.tokenizer import load_tokenizer

    spec = c.tokenizer
    if spec.startswith("spm:stdlib"):
        vocab = int(spec.split(":")[2]) if spec.count(":") >= 2 else 4096
        out = paths.join(workdir, "tokenizer")
        path = paths.join(out, "spm.model")
        if not paths.exists(path):
            if jax.process_index() == 0:
                if paths.is_url(out):  # trained locally, then one object written (its appearance is atomic)
                    import tempfile

                    with tempfile.TemporaryDirectory() as tmp:
                        train_spm(tmp, vocab_size=vocab, seed=c.seed)
                        paths.upload(os.path.join(tmp, "spm.model"), path)
                else:
                    tmp = f"{out}.tmp-{os.getpid()}"  # unique: never another trainer's half-written files
                    try:
                        train_spm(tmp, vocab_size=vocab, seed=c.seed)
                        os.replace(tmp, out)
                    finally:
                        shutil.rmtree(tmp, ignore_errors=True)
            else:
                while not paths.exists(path):
                    time.sleep(0.5)
        return load_tokenizer(path), path
    if spec == "":
        from qcjax.loader import is_hf_dir

        if not (c.init_from and is_hf_dir(c.init_from)):
            raise ConfigError("config.tokenizer is empty and init_from is not an HF directory with a tokenizer: "
                              "set --config.tokenizer=PATH (tokenizer.json, a SentencePiece .model, or 'qwen')")
        spec = c.init_from
    return load_tokenizer(spec), spec


def make_iterator(c: TrainConfig, tok, seed: int, *, eval_split: bool = False):
    """This process's share of the data: a Grain iterator of numpy batches [local_batch, seq_len]."""
    from qcjax.data import pipeline

    return pipeline.make_iterator(
        c.task, c.data, tok, seq_len=c.seq_len, batch_size=c.batch_size // jax.process_count(), seed=seed,
        process_index=jax.process_index(), process_count=jax.process_count(), split="eval" if eval_split else "train",
    )


def to_global(batch: dict, mesh) -> dict:
    """Per-process numpy rows -> global jax arrays sharded over the data-parallel axes."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), np.asarray(v))
            for k, v in batch.items()}


# ---- the run --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunResult:
    final_step: int
    last_metrics: dict
    resumed_from: int | None
    stopped_at: int | None = None  # the step a SIGTERM/SIGINT stopped the run at (saved); None: ran to the end


def _progress(total: int, initial: int):
    if jax.process_index() != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)


class StopRequests:
    """SIGTERM (a TPU VM's preemption notice, `kill`) or SIGINT (Ctrl-C) asks the run to save at the next step
    boundary and stop; a second SIGINT interrupts at once. Multi-process runs agree on the step through JAX's
    preemption sync point (SIGTERM) or an all-gather of the flag at logging steps (SIGINT)."""

    def __init__(self):
        self.signal: int | None = None
        self._old: dict = {}

    def __enter__(self) -> "StopRequests":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, sig, frame):
        import signal

        if sig == signal.SIGINT and self.signal is not None:
            raise KeyboardInterrupt
        self.signal = sig
        print(f"\n[qcjax] {signal.Signals(sig).name}: saving a checkpoint at the end of this step, then stopping "
              "(Ctrl-C again to stop at once, losing the steps since the last checkpoint)", file=sys.stderr)

    def __exit__(self, *exc) -> None:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)

    def reached(self, step: int, gather: bool) -> bool:
        """Whether every process stops after `step` (all processes call it at every step, with the same `gather`:
        whether to all-gather the SIGINT flag now, a host round trip kept to logging steps)."""
        if jax.process_count() == 1:
            return self.signal is not None
        from jax.experimental import multihost_utils

        try:
            if multihost_utils.reached_preemption_sync_point(step):
                return True
        except RuntimeError:  # no preemption service (jax.distributed started without it)
            pass
        return gather and bool(np.any(multihost_utils.process_allgather(np.array(self.signal is not None))))


def train(c: TrainConfig, workdir: str) -> RunResult:
    """Run (or resume) training as configured, in `workdir` (checkpoints/, metrics.jsonl, tensorboard/). One
    trainer per workdir (a lock file); SIGTERM/SIGINT save at the next step boundary and stop (`stopped_at`).
    `c`: the run config as `from_config` returns it; a ConfigDict (a config file's, in a notebook or a script) is
    parsed and checked here, before anything is written, and the run reads the TrainConfig from then on."""
    from qcjax.train.lock import WorkdirBusy, WorkdirLock

    c = from_config(c)

    workdir = paths.absolute(workdir) if paths.is_url(workdir) else workdir  # gs://...: no trailing slash
    paths.makedirs(workdir)  # a no-op for a gs:// URL (objects need no directories)
    lock = WorkdirLock(workdir)
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except WorkdirBusy as e:
            raise RunError(str(e)) from None
    try:
        with StopRequests() as stop:
            return _train(c, workdir, stop)
    except OSError as e:  # a full disk under metrics, TensorBoard or the tokenizer: one line, like the checkpoints'
        if paths.is_disk_full(e) and not isinstance(e, paths.DiskFull):
            raise paths.DiskFull(workdir, "the run's files", "free some space and rerun the same command to resume "
                                 "from the newest checkpoint") from None
        raise
    finally:
        lock.release()


def check_start(tc: TrainConfig, workdir: str) -> None:
    """What a new run's start needs, checked before anything is written (a tokenizer trained into the workdir):
    init_from names a model, and adapters have a base to adapt (LoRA on a frozen random base learns nothing). A run
    with checkpoints resumes and ignores init_from, so it is not asked."""
    ckpts = paths.join(workdir, "checkpoints")
    if paths.isdir(ckpts) and any(d.isdigit() for d in paths.listdir(ckpts)):
        return
    if tc.init_from:
        from qcjax.loader import load_config

        try:
            load_config(tc.init_from)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"init_from={tc.init_from}: {' '.join(str(e).split())}") from None
    elif tc.lora.rank:
        raise ConfigError(f"lora.rank={tc.lora.rank} without init_from: the adapters would train on a frozen random "
                          "base and learn nothing; set init_from to the model to adapt (an HF directory or a qcjax "
                          "checkpoint)")


def _train(c: TrainConfig, workdir: str, stop: StopRequests) -> RunResult:
    from qcjax.checkpoint import Checkpointer

    check_start(c, workdir)
    tok, tok_path = setup_tokenizer(c, workdir)
    cfg = model_config(c, vocab_hint=tok.vocab_size)
    if tok.vocab_size > cfg.vocab_size:
        raise ConfigError(f"tokenizer {tok_path} has {tok.vocab_size} ids but the model only {cfg.vocab_size} rows")
    mesh = validate(c, cfg, jax.process_count())

    with jax.set_mesh(mesh):
        prog = build_train_program(c, cfg, mesh)
        tx, p_shard, ad = prog.tx, prog.param_shardings, prog.adaptation
        eval_step = make_eval_step(cfg, StepConfig.of(c), ad)
        ckpt = Checkpointer(paths.join(workdir, "checkpoints"), max_to_keep=c.keep_checkpoints)
        rollouts = None
        if c.task == "rl":  # rows sampled from the params being trained; a function of (seed, step): no iterator
            from qcjax.rl.rollouts import Rollouts

            train_it = None
            rollouts = Rollouts(c, cfg, tok, mesh)
        else:
            train_it = make_iterator(c, tok, c.seed)

        state, resumed, broken = _resume(c, ckpt, prog, train_it)
        if resumed and c.resume_data == "reseed" and train_it is not None:  # a fresh order for the rest of the run
            log.warning("resume_data=reseed: the data iterator restarts with seed %d + step %d (the params and "
                        "optimizer state are the checkpoint's)", c.seed, resumed)
            train_it = make_iterator(c, tok, c.seed + resumed)
        if broken:  # set the corrupt steps aside so that they are never listed (or overwritten) again
            ckpt.close()
            _set_aside(ckpt.directory, broken)
            ckpt = Checkpointer(paths.join(workdir, "checkpoints"), max_to_keep=c.keep_checkpoints)
        ckpt.protect(resumed)  # the newest good step stays until a newer one has trained finitely
        if jax.process_index() == 0:
            _truncate_metrics(workdir, resumed or 0)
        ref_params = base_params = None
        if ad.lora is not None:  # the frozen base (every start and resume: checkpoints hold the adapters only)
            base_params = lora_base_params(c, cfg, ad, mesh, prog.base_shardings)
            if state is None:
                state = jax.jit(lambda: init_state(lora_init(cfg, ad, c.seed), tx),
                                out_shardings=prog.state_shardings)()
        elif state is None:
            params = initial_params(c, cfg, mesh, p_shard)
            if _frozen_reference(c):
                ref_params = jax.tree.map(jnp.copy, params)
            state = jax.jit(lambda p: init_state(p, tx), out_shardings=prog.state_shardings)(params)
        elif _frozen_reference(c):
            ref_params = initial_params(c, cfg, mesh, p_shard)

        step_fn = prog.step_fn
        eval_fn = jax.jit(eval_step)
        eval_it = None
        if c.eval_every and c.task not in ("dpo", "rl"):  # DPO and RL report their own figures from the step
            eval_it = make_iterator(c, tok, c.seed, eval_split=True)
            eval_start = eval_it.get_state()  # every evaluation reads the same held-out batches
        writer = mt.MetricsWriter(workdir, enabled=jax.process_index() == 0)
        peak = mt.peak_flops(override=c.peak_flops_per_device)
        n_dev = jax.device_count()
        train_meta = {"train": run_record(c), "tokenizer": tok_path}
        if ad.lora is not None:  # the adapters' spec, and what they apply to (qcjax.loader rebuilds it)
            train_meta["adaptation"] = ad.to_dict()
            train_meta["lora_base"] = {"init_from": c.init_from, "seed": c.seed}

        start = int(state["step"])
        bar = _progress(c.steps, start)
        last: dict = {}
        stopped_at = None
        window_t, window_steps = time.perf_counter(), 0
        prev = None
        window_rl: list[dict] = []
        try:
            for step in range(start, c.steps):
                if rollouts is not None:
                    rows, rm = rollouts.batch(step, state["params"])
                    window_rl.append(rm)
                    batch = to_global(rows, mesh)
                else:
                    batch = to_global(next(train_it), mesh)
                state, m = step_fn(state, batch, ref_params, base_params)
                done = step + 1
                window_steps += 1
                if done % c.log_every == 0 or done == c.steps:
                    m = jax.device_get(m)
                    dt = time.perf_counter() - window_t
                    last = {k: float(v) for k, v in m.items()}
                    last["target_tokens"] = last.pop("tokens")  # loss-counted tokens in the last step
                    last["step_time_s"] = dt / window_steps
                    # throughput counts every row position processed (padding included), as the MFU does
                    last["tokens_per_s"] = mt.tokens_per_step(c.task, c.batch_size, c.seq_len) * window_steps / dt
                    last["mfu"] = mt.mfu(cfg, c.seq_len, last["tokens_per_s"], n_dev, peak)
                    if window_rl:  # the rollouts' figures, averaged over the steps since the last line
                        last.update({k: float(np.mean([r[k] for r in window_rl])) for k in window_rl[0]})
                        window_rl = []
                    writer.write(done, last)
                    if last["target_tokens"] == 0:
                        log.warning("step %d: the batch had no loss tokens (all masked or truncated away: check "
                                    "seq_len and the data format)", done)
                    if bar is not None and "reward_mean" in last:
                        bar.set_postfix(reward=f"{last['reward_mean']:.3f}", pass_rate=f"{last['pass_rate']:.3f}",
                                        kl=f"{last['kl']:.2e}", len=f"{last['completion_len']:.0f}")
                    elif bar is not None:
                        bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}",
                                        tok_s=f"{last['tokens_per_s']:.0f}")
                    window_t, window_steps = time.perf_counter(), 0
                # The previous step's skip counter (already computed: reading it does not stall the pipeline).
                if prev is not None:
                    _check_nonfinite(prev, done - 1, c.max_nonfinite_in_row)
                prev = m["nonfinite_in_row"]
                if bar is not None:
                    bar.update(1)
                if eval_it is not None and (done % c.eval_every == 0 or done == c.steps):
                    eval_it.set_state(eval_start)
                    ev = _evaluate(eval_fn, state["params"], eval_it, c.eval_steps, mesh, base_params)
                    writer.write(done, ev, prefix="eval_")
                    last.update({f"eval_{k}": v for k, v in ev.items()})
                stopping = stop.reached(done, gather=done % c.log_every == 0)
                if done % c.checkpoint_every == 0 or done == c.steps or stopping:
                    ckpt.save(done, state["params"], cfg, opt_state=state["opt_state"], data_iter=train_it,
                              extra_config=train_meta, force=True)
                    if int(jax.device_get(m["nonfinite_in_row"])) == 0:  # this step's update was finite
                        ckpt.protect(done)
                if stopping and done < c.steps:
                    stopped_at = done
                    log.warning("stopped at step %d on request; checkpoint saved: rerun the same command to resume",
                                done)
                    break
            if prev is not None:
                _check_nonfinite(prev, c.steps, c.max_nonfinite_in_row)
        finally:
            if bar is not None:
                bar.close()
            if rollouts is not None:
                rollouts.close()
            ckpt.close()  # waits for the last async save
            writer.close()
    return RunResult(final_step=int(state["step"]), last_metrics=last, resumed_from=resumed, stopped_at=stopped_at)


def _frozen_reference(c: TrainConfig) -> bool:
    """Whether the step takes a frozen copy of the starting weights: DPO's frozen reference, RL's KL reference."""
    return ((c.task == "dpo" and c.dpo.reference == "frozen")
            or (c.task == "rl" and c.rl.kl_coef > 0 and c.rl.kl_reference == "init"))


def _check_nonfinite(in_row, step: int, limit: int) -> None:
    n = int(jax.device_get(in_row))
    if n:
        log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)", step, n)
    if n >= limit:
        raise FloatingPointError(f"{n} steps in a row had a non-finite loss or gradient (up to step {step}); "
                                 "stopping. Lower the learning rate or check the data.")


def initial_params(c: TrainConfig, cfg: ModelConfig, mesh, p_shard):
    """The starting params: `init_from` (an HF directory or a qcjax checkpoint, `qcjax.load`) or a seeded init."""
    if not c.init_from:
        return jax.jit(lambda: init_params(cfg, jax.random.key(c.seed)), out_shardings=p_shard)()
    from qcjax.loader import load

    return load(c.init_from, mesh=mesh, dtype=cfg.param_dtype)[1]


def lora_init(cfg: ModelConfig, ad: Adaptation, seed: int):
    """The adapters' starting values (A random, B zero) for seed; traced under jit, the base's init is dead code."""
    return adapters.split(adapters.init_params(cfg, ad, jax.random.key(seed)))[1]


def lora_base_params(c: TrainConfig, cfg: ModelConfig, ad: Adaptation, mesh, base_shardings):
    """A LoRA run's frozen base (adapters.freeze_base: compute dtype, quantized under QLoRA): init_from's weights,
    read straight in the compute dtype (never a whole fp32 copy on the chips), or the seeded init."""
    from qcjax.model import abstract_params as abstract

    plain = cfg.replace(param_dtype=cfg.dtype) if c.init_from else cfg
    base = initial_params(c, plain, mesh, param_shardings(abstract(plain), mesh))
    return jax.jit(lambda p: adapters.freeze_base(cfg, p, ad.quant), out_shardings=base_shardings,
                   donate_argnums=0)(base)


def _resume(c: TrainConfig, ckpt, prog: TrainProgram, train_it):
    """(state, step, corrupt steps) from the newest intact checkpoint of the run; state None: a fresh run.
    Corrupt steps (unreadable, or not matching their checksums) fall back to the previous one; a step that does
    not fit this config stops the run with what differs (ConfigError)."""
    from qcjax.checkpoint import CheckpointMismatch

    if not ckpt.all_steps():
        return None, None, []
    target_p = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), prog.abstract_params,
                            prog.param_shardings)
    target_o = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            jax.eval_shape(prog.tx.init, prog.abstract_params), prog.opt_shardings)
    corrupt: list[int] = []

    reseed = c.resume_data == "reseed"

    def attempt(step):
        try:  # resume_data="reseed": the iterator's saved position is not read (the caller re-derives it)
            return ckpt.restore_train_state(step, params=target_p, opt_state=target_o,
                                            data_iter=None if reseed else train_it)
        except CheckpointMismatch as e:
            raise ConfigError(_mismatch_message(c, ckpt.directory, e)) from None

    try:
        step, out, corrupt = ckpt.restore_newest(attempt)
    except FileNotFoundError as e:
        raise RunError(f"{e}. Nothing was moved or deleted; to start this run over, move {ckpt.directory} away "
                       "(or use a new --workdir)") from None
    try:
        then = ckpt.read_config(step)[1].get("train") or {}
    except (OSError, ValueError):
        then = {}
    refusal, changes = resume_changes(then, run_record(c), step, ckpt.directory)
    if refusal:
        raise ConfigError(refusal)
    print(f"[qcjax] resuming from checkpoint step {step} in {ckpt.directory}"
          + (f"; changed since it was saved: {'; '.join(changes)}" if changes else ""), file=sys.stderr)
    state = {"step": jnp.asarray(step, jnp.int32), "params": out["params"], "opt_state": out["opt_state"]}
    return state, step, corrupt


def run_record(c: TrainConfig) -> dict:
    """The run config as the checkpoints record it (their "train" entry) and a resume compares it: the nested
    dicts of its ConfigDict form (`to_config_dict`)."""
    return to_config_dict(c).to_dict()


RESUME_FIELDS = ("steps", "seed", "seq_len", "batch_size", "optimizer")  # a resume says when these changed


def resume_changes(then: dict, now: dict, step: int, directory: str) -> tuple[str | None, list[str]]:
    """What differs between the config that saved `step` (`then`, the checkpoint's "train" entry) and this run's,
    in the fields that change what resuming means: (why resuming cannot mean what the user thinks, or None; each
    change as 'field: old -> new'). Refused: `steps` below the saved step (nothing left to train), and with
    resume_data=exact a changed seed or seq_len (the data position restored is the old seed's order, in rows of the
    old length: the change would silently not apply)."""
    def flat(d: dict) -> dict:
        out = {}
        for k in RESUME_FIELDS:
            v = d.get(k)
            if isinstance(v, dict):
                out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
            elif k in d:
                out[k] = v
        return out

    a, b = flat(then), flat(now)
    changes = [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if k in b and a[k] != b[k]]
    if isinstance(b.get("steps"), int) and b["steps"] < step:
        return (f"steps={b['steps']} is below step {step}, where the run in {directory} already is: raise "
                f"--config.steps to train on from it, or use a new --workdir to start over"), changes
    exact = now.get("resume_data", "exact") == "exact"
    moved = [k for k in ("seed", "seq_len") if k in a and k in b and a[k] != b[k]]
    if moved and exact:
        return (f"{' and '.join(f'{k} {a[k]!r} -> {b[k]!r}' for k in moved)} since step {step} in {directory}: a "
                "resume continues the saved data position (the old seed's order, rows of the old seq_len), so "
                "the change would not apply; add --config.resume_data=reseed to resume the weights with the data "
                "re-derived under the new settings, or use a new --workdir (and --config.init_from="
                f"{directory} to start from these weights)"), changes
    return None, changes


def _mismatch_message(c: TrainConfig, directory: str, e) -> str:
    """What differs between a checkpoint and this run's config, and how to proceed."""
    from qcjax.checkpoint import read_config

    then = {}
    try:
        then = read_config(directory, e.step)[1].get("train") or {}
    except (OSError, ValueError):
        pass
    now = run_record(c)
    fields = [f"{sec}.{k}: {then[sec][k]!r} in the checkpoint, {v!r} now"
              for sec in ("model", "optimizer") if isinstance(then.get(sec), dict)
              for k, v in now[sec].items() if k in then[sec] and then[sec][k] != v]
    fix = ("rerun with the settings the run was started with")
    if any(d.startswith("process count") for d in e.differences):
        fix = ("rerun on the process count that wrote it, or add --config.resume_data=reseed to resume the params "
               "and optimizer here with the data order re-derived from the step (not the exact batches an "
               "unchanged run would see)")
    return (f"{e}" + (f" (config: {'; '.join(fields)})" if fields else "") +
            f". To resume, {fix}; to start a new run from these weights, use a new --workdir with "
            f"--config.init_from={directory}")


def _truncate_metrics(workdir: str, step: int) -> None:
    """metrics.jsonl keeps the rows up to `step` (where the run resumes): the steps after it are trained again and
    logged again, so every step has one row after any number of resumes. Rewritten atomically."""
    path = paths.join(workdir, mt.METRICS_FILE)
    if not paths.exists(path):
        return
    keep, dropped = [], 0
    with paths.open_file(path) as f:
        for line in f:
            try:
                row = json.loads(line)
                ok = int(row["step"]) <= step
            except (ValueError, KeyError, TypeError):  # a line cut off by a kill
                ok = False
            if ok:
                keep.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped and paths.is_url(path):  # one object, rewritten whole (replacing an object is atomic)
        with paths.open_file(path, "w") as f:
            f.writelines(keep)
    elif dropped:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
        log.info("metrics.jsonl: dropped %d rows after step %d (those steps run again from the checkpoint)",
                 dropped, step)


def _set_aside(directory: str, steps: list[int]) -> None:
    if jax.process_index() == 0:
        for step in steps:
            dst = paths.join(directory, f"unreadable-step-{step}-{int(time.time())}")
            paths.replace(paths.join(directory, str(step)), dst)  # gs://: copied, then deleted (not atomic)
            log.warning("moved the corrupt checkpoint step %d to %s (kept for inspection; delete it when done)",
                        step, dst)
            print(f"[qcjax] moved the corrupt checkpoint step {step} to {dst}", file=sys.stderr)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("qcjax_set_aside_checkpoints")


def _evaluate(eval_fn, params, it, n_batches: int, mesh, base_params=None) -> dict:
    total, count = 0.0, 0.0
    for _ in range(n_batches):
        loss_sum, n = jax.device_get(eval_fn(params, to_global(next(it), mesh), base_params))
        total, count = total + float(loss_sum), count + float(n)
    loss = total / max(count, 1.0)
    return {"loss": loss, "perplexity": float(math.exp(min(loss, 50.0))), "tokens": count}
