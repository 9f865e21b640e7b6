"""The train step: a pure function (state, batch) -> (state, metrics), jitted by the loop with shardings.

Gradient accumulation runs inside the step (lax.scan over micro-batches); the token-weighted loss is normalised once
over the whole batch, so accumulating over k micro-batches computes the same update as one big batch. A non-finite
loss or gradient skips the update (optax.apply_if_finite) and is counted in the optimizer state.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from qcjax import adapters
from qcjax.config import NO_ADAPTATION, Adaptation, ModelConfig
from qcjax.sharding import constrain
from qcjax.train.config import DpoConfig, OptimizerConfig, RlConfig, TrainConfig
from qcjax.train.losses import cross_entropy, dpo_loss, next_token_targets, policy_loss, target_logprobs

# {"step": int32 [], "params": pytree, "opt_state": optax state}. With LoRA adapters "params" holds the adapters
# only (qcjax.adapters.split): the frozen base is the step's `base_params` argument.
TrainState = dict

# Never let optax.apply_if_finite give up: the loop stops the run itself (the run config's max_nonfinite_in_row).
_NEVER = 2**30


def lr_schedule(c: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """The learning rate at each step of a run of `total_steps` (the run config's `steps`)."""
    if c.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, c.lr, max(c.warmup_steps, 0), max(total_steps, c.warmup_steps + 1), end_value=c.lr * c.end_lr_ratio
        )
    if c.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, c.lr, max(c.warmup_steps, 1)), optax.constant_schedule(c.lr)],
            [max(c.warmup_steps, 1)],
        )
    raise ValueError(f"optimizer.schedule={c.schedule!r}: expected 'cosine' or 'constant'")


def decay_mask(params) -> Any:
    """Weight decay on matrices only: never on norm scales and biases."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key not in ("scale", "bias"), params)


def make_optimizer(c: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(c.clip_norm)] if c.clip_norm > 0 else []
    parts.append(
        optax.adamw(lr_schedule(c, total_steps), b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                    mask=decay_mask)
    )
    return optax.apply_if_finite(optax.chain(*parts), max_consecutive_errors=_NEVER)


def init_state(params, tx: optax.GradientTransformation) -> TrainState:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def nonfinite_counts(opt_state) -> tuple[jax.Array, jax.Array]:
    """(skipped steps in a row, skipped steps in total), from optax.apply_if_finite's state (0 without it)."""
    zero = jnp.zeros((), jnp.int32)
    return getattr(opt_state, "notfinite_count", zero), getattr(opt_state, "total_notfinite", zero)


def _split_micro(batch: dict, accum: int) -> dict:
    """[batch, ...] -> [accum, batch // accum, ...]; micro-batch a takes rows a, a+accum, ... so each micro-batch
    stays spread over every data-parallel device (rows are sharded in contiguous blocks)."""

    def split(x):
        if x.shape[0] % accum:
            raise ValueError(f"batch of {x.shape[0]} rows is not divisible by grad_accum={accum}")
        x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, batch)


def _hidden(cfg: ModelConfig, ad: Adaptation, params, tokens, positions, segment_ids, rngs: dict | None):
    """The final-norm hidden states of the model adapted as `ad` says (qcjax.adapters.build)."""
    return adapters.build(cfg, ad, deterministic=rngs is None).apply(
        {"params": params}, tokens, positions, segment_ids, method="hidden_states", rngs=rngs)[0]


def lm_loss_terms(cfg: ModelConfig, params, micro: dict, chunk: int, rngs: dict | None = None,
                  ad: Adaptation = NO_ADAPTATION):
    """(sum of token losses, number of target tokens) for packed next-token rows (pretrain and SFT). rngs: {"dropout":
    key} when the adapters have dropout; ad: how the model is adapted (LoRA, a quantized base)."""
    tokens = constrain(micro["tokens"], ("act_batch", "act_length"))
    hidden = _hidden(cfg, ad, params, tokens, micro["positions"], micro["segment_ids"], rngs)
    targets, weights = next_token_targets(tokens, micro["segment_ids"], micro["loss_mask"])
    return cross_entropy(cfg, params, hidden, targets, weights, chunk)


def sequence_logprobs(cfg: ModelConfig, params, tokens, segment_ids, loss_mask, chunk: int,
                      rngs: dict | None = None, ad: Adaptation = NO_ADAPTATION) -> jax.Array:
    """Summed log-prob of the masked (completion) tokens of each row: [rows] float32."""
    hidden = _hidden(cfg, ad, params, tokens, None, segment_ids, rngs)
    targets, weights = next_token_targets(tokens, segment_ids, loss_mask)
    return jnp.sum(target_logprobs(cfg, params, hidden, targets, chunk) * weights, axis=-1)


def dpo_logprobs(cfg: ModelConfig, params, micro: dict, chunk: int, rngs: dict | None = None,
                 ad: Adaptation = NO_ADAPTATION) -> tuple[jax.Array, jax.Array]:
    """Policy log-probs of chosen and rejected completions in ONE forward pass (pairs stacked on the batch axis)."""
    n = micro["chosen_tokens"].shape[0]
    cat = lambda k: jnp.concatenate([micro[f"chosen_{k}"], micro[f"rejected_{k}"]], axis=0)
    lp = sequence_logprobs(cfg, params, cat("tokens"), cat("segment_ids"), cat("loss_mask"), chunk, rngs, ad)
    return lp[:n], lp[n:]


def token_logprobs(cfg: ModelConfig, params, micro: dict, chunk: int, rngs: dict | None = None,
                   temperature: float = 1.0, ad: Adaptation = NO_ADAPTATION) -> tuple[jax.Array, jax.Array]:
    """(log p of each next token [rows, seq], its weight: 1 where the target is a loss_mask token) of RL rows, under
    the sampling temperature (the policy the rollouts drew from)."""
    hidden = _hidden(cfg, ad, params, micro["tokens"], micro["positions"], micro["segment_ids"], rngs)
    targets, weights = next_token_targets(micro["tokens"], micro["segment_ids"], micro["loss_mask"])
    return target_logprobs(cfg, params, hidden, targets, chunk, temperature), weights


RL_METRICS = ("kl", "clip_fraction", "ratio", "entropy")


def rl_terms(cfg: ModelConfig, sc: "StepConfig", params, micro: dict, ref_logp_fn=None, rngs: dict | None = None,
             ad: Adaptation = NO_ADAPTATION):
    """(loss sum, (normaliser, metric sums)) of RL rows (task rl: tokens, positions, segment_ids, loss_mask over
    the completion, advantages [rows]). On-policy: the rows were sampled from `params`, so the old log-probs are
    the policy's own, held constant (one update per rollout batch: the ratio is 1 and its gradient the policy
    gradient). ref_logp_fn(micro): the reference's token log-probs (rl.kl_coef > 0)."""
    logp, w = token_logprobs(cfg, params, micro, sc.loss_chunk, rngs, sc.rl.temperature, ad)
    ref = jax.lax.stop_gradient(ref_logp_fn(micro)) if ref_logp_fn is not None else None
    r = sc.rl
    loss_sum, norm, m = policy_loss(logp, jax.lax.stop_gradient(logp), micro["advantages"], w, r.loss_type,
                                    r.clip_low, r.clip_high, ref, r.kl_coef, r.max_new_tokens)
    ent = -jnp.sum(jax.lax.stop_gradient(logp) * w) / jnp.maximum(jnp.sum(w), 1.0)  # sampled tokens' mean -log p
    return loss_sum, (norm, {**m, "entropy": ent * norm})


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the step reads of the run config (qcjax.train.config.TrainConfig documents each field), with no defaults
    of its own: `StepConfig.of(tc, grad_accum)` takes them from a TrainConfig. grad_accum is the resolved
    micro-batch count (qcjax.train.loop.grad_accum_for); seed draws the adapters' dropout masks:
    fold_in(key(seed), step), split per micro-batch."""

    task: str
    grad_accum: int
    loss_chunk: int
    dpo: DpoConfig
    rl: RlConfig
    seed: int

    @classmethod
    def of(cls, tc: TrainConfig, grad_accum: int | None = None) -> "StepConfig":
        """The step's view of the run config `tc`; grad_accum: the resolved value (None: tc.grad_accum)."""
        return cls(task=tc.task, grad_accum=tc.grad_accum if grad_accum is None else grad_accum,
                   loss_chunk=tc.loss_chunk, dpo=tc.dpo, rl=tc.rl, seed=tc.seed)


def make_train_step(cfg: ModelConfig, sc: StepConfig, tx: optax.GradientTransformation, schedule: Callable,
                    ad: Adaptation = NO_ADAPTATION):
    """Build step(state, batch, ref_params=None, base_params=None) -> (state, metrics).

    DPO: the batch has chosen_*/rejected_* rows; the reference log-probs come from `ref_params` (a frozen copy) or,
    when ref_params is None, from precomputed batch fields "ref_chosen_logp"/"ref_rejected_logp".
    LoRA (ad.lora): state["params"] are the adapters, differentiated and updated alone (the layers outside
    ad.lora.layers masked); `base_params` is the frozen base (quantized under QLoRA). DPO's frozen reference is
    then the base without adapters (dpo.reference "frozen"; ref_params unused).
    """
    lora = ad.lora is not None
    base_ad = ad.replace(lora=None)  # the frozen base as the adapted model sees it (quantized under QLoRA)
    dropout = lora and ad.lora.dropout > 0

    def micro_terms(params, micro, ref_params, base_params, rng):
        rngs = {"dropout": rng} if dropout else None
        full = adapters.combine(base_params, params) if lora else params
        if sc.task in ("pretrain", "sft"):
            loss_sum, count = lm_loss_terms(cfg, full, micro, sc.loss_chunk, rngs, ad)
            return loss_sum, (count, {})
        if sc.task == "rl":
            ref_fn = None
            if sc.rl.kl_coef and lora:  # the reference is the base without adapters
                ref_fn = lambda mb: token_logprobs(cfg, base_params, mb, sc.loss_chunk,  # noqa: E731
                                                   temperature=sc.rl.temperature, ad=base_ad)[0]
            elif sc.rl.kl_coef:
                ref_fn = lambda mb: token_logprobs(cfg, ref_params, mb, sc.loss_chunk,  # noqa: E731
                                                   temperature=sc.rl.temperature)[0]
            return rl_terms(cfg, sc, full, micro, ref_fn, rngs, ad)
        if sc.task != "dpo":
            raise ValueError(f"task {sc.task!r}: expected 'pretrain', 'sft', 'dpo' or 'rl'")
        chosen, rejected = dpo_logprobs(cfg, full, micro, sc.loss_chunk, rngs, ad)
        if lora and sc.dpo.reference == "frozen":
            ref_c, ref_r = jax.lax.stop_gradient(dpo_logprobs(cfg, base_params, micro, sc.loss_chunk, ad=base_ad))
        elif ref_params is not None:
            ref_c, ref_r = jax.lax.stop_gradient(dpo_logprobs(cfg, ref_params, micro, sc.loss_chunk))
        else:
            ref_c, ref_r = micro["ref_chosen_logp"], micro["ref_rejected_logp"]
        valid = (jnp.sum(micro["chosen_loss_mask"], axis=-1) > 0).astype(jnp.float32)  # padding pairs: none
        _, w = next_token_targets(micro["chosen_tokens"], micro["chosen_segment_ids"], micro["chosen_loss_mask"])
        chosen_tokens = jnp.sum(w, axis=-1)  # the tokens chosen_logp sums over
        losses, m = dpo_loss(chosen, rejected, ref_c, ref_r, sc.dpo.beta, sc.dpo.label_smoothing, sc.dpo.loss_type,
                             weights=valid, rpo_alpha=sc.dpo.rpo_alpha, chosen_tokens=chosen_tokens)
        n = jnp.sum(valid)
        return jnp.sum(losses * valid), (n, jax.tree.map(lambda v: v * n, m))  # metrics summed, divided below

    grad_fn = jax.value_and_grad(micro_terms, has_aux=True)

    def step(state: TrainState, batch: dict, ref_params=None, base_params=None):
        params = state["params"]
        micro_batches = _split_micro(batch, sc.grad_accum)
        rngs = (jax.random.split(jax.random.fold_in(jax.random.key(sc.seed), state["step"]), sc.grad_accum)
                if dropout else jnp.zeros((sc.grad_accum,), jnp.int32))  # one dropout key per micro-batch

        def body(carry, xs):
            micro, rng = xs
            g_acc, l_acc, n_acc, m_acc = carry
            (loss_sum, (n, m)), g = grad_fn(params, micro, ref_params, base_params, rng)
            g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
            return (g_acc, l_acc + loss_sum, n_acc + n, jax.tree.map(jnp.add, m_acc, m)), None

        if sc.grad_accum == 1:  # no accumulator: saves zero-filling and re-reading a params-sized fp32 tree
            (loss_sum, (count, msum)), grads = grad_fn(params, jax.tree.map(lambda x: x[0], micro_batches), ref_params,
                                                       base_params, rngs[0])
            grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        else:
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            m0 = {}
            if sc.task == "dpo":
                m0 = {k: jnp.zeros((), jnp.float32) for k in ("reward_margin", "reward_accuracy", "chosen_reward",
                                                              "rejected_reward")}
            elif sc.task == "rl":
                m0 = {k: jnp.zeros((), jnp.float32) for k in RL_METRICS}
            init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), m0)
            (grads, loss_sum, count, msum), _ = jax.lax.scan(body, init, (micro_batches, rngs))
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        if lora:  # adapters of the layers outside ad.lora.layers never move
            grads = adapters.mask_layers(cfg, ad.lora, grads)
        loss = loss_sum / denom
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        if lora:
            updates = adapters.mask_layers(cfg, ad.lora, updates)
        new_params = optax.apply_updates(params, updates)
        skipped, skipped_total = nonfinite_counts(opt_state)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": schedule(state["step"]),
            "tokens": (jnp.sum(batch["chosen_loss_mask"]) + jnp.sum(batch["rejected_loss_mask"]) if sc.task == "dpo"
                       else jnp.sum(batch["loss_mask"]) if sc.task == "rl" else count),
            "nonfinite_in_row": skipped,
            "nonfinite_total": skipped_total,
            **{k: v / denom for k, v in msum.items()},
        }
        return {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}, metrics

    return step


def make_eval_step(cfg: ModelConfig, sc: StepConfig, ad: Adaptation = NO_ADAPTATION):
    """eval(params, batch, base_params=None) -> (sum of token losses, token count) for pretrain/SFT rows (LoRA:
    params are the adapters, base_params the base; no dropout)."""

    def evaluate(params, batch, base_params=None):
        full = adapters.combine(base_params, params) if ad.lora is not None else params
        return lm_loss_terms(cfg, full, batch, sc.loss_chunk, ad=ad)

    return evaluate
