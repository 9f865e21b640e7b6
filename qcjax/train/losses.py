"""Losses in float32 from hidden states, with vocabulary-wide logits produced a chunk of tokens at a time.

At 152K vocabulary x 32K tokens the full logits would be 20 GB in fp32; here each device holds only about
[chunk, vocab] at once, in the forward and (through jax.checkpoint) in the backward pass.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from qcjax.config import ModelConfig
from qcjax.model import head_kernel, head_logits
from qcjax.sharding import batch_shards, constrain


def next_token_targets(tokens, segment_ids, loss_mask):
    """Targets and weights for next-token prediction on packed rows.

    tokens, segment_ids, loss_mask: [batch, seq]; loss_mask is label-aligned (loss_mask[t] says whether predicting
    tokens[t] counts). Position t predicts tokens[t+1] only inside one segment: never across a document boundary,
    never into padding. Returns targets [batch, seq] int32 and weights [batch, seq] float32 (last position 0).
    """
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1).astype(jnp.int32)
    nxt_seg = jnp.concatenate([segment_ids[:, 1:], jnp.zeros_like(segment_ids[:, :1])], axis=1)
    nxt_mask = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1)
    weights = (nxt_seg == segment_ids) & (nxt_seg != 0) & (nxt_mask != 0)
    return targets, weights.astype(jnp.float32)


def target_logprobs(cfg: ModelConfig, params, hidden: jax.Array, targets: jax.Array, chunk: int = 2048,
                    temperature: float = 1.0) -> jax.Array:
    """log p(targets) [batch, seq] float32 from final hidden states [batch, seq, embed], about `chunk` tokens per
    device at a time. temperature != 1: of the distribution softmax(logits / temperature) (what a sampler at that
    temperature draws from: RL's policy).

    Chunks split the sequence, never the batch: each device computes the logits of its own rows against the
    gathered head, as the rest of the step does. (Chunks of the flattened tokens would each live on one device, and
    XLA would compute them from embed-sharded hidden states and all-reduce [chunk, vocab] fp32 logits per chunk.)
    """
    b, t, e = hidden.shape
    rows = -(-b // batch_shards(b))  # rows on each device
    ct = max(1, min(t, chunk // rows))  # positions per chunk
    pad = (-t) % ct
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, ct, e).swapaxes(0, 1)  # [chunks, batch, ct, embed]
    y = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, -1, ct).swapaxes(0, 1)  # [chunks, batch, ct]
    h = constrain(h, (None, "act_batch", None, "act_embed"))
    y = constrain(y, (None, "act_batch", None))

    kernel = head_kernel(cfg, params)  # [embed, vocab]

    def one(w, hc, yc):
        # As one [batch * ct, embed] matrix: the 3-D form, inside this checkpointed scan with fp32 params and bf16
        # compute, reached XLA:CPU's DotThunk, which has no bf16 x bf16 -> f32 kernel (a lone _project does not).
        logits = head_logits(cfg, hc.reshape(-1, e), w)  # [batch * ct, vocab] fp32
        if temperature != 1.0:
            logits = logits / temperature
        lp = jnp.take_along_axis(logits, yc.reshape(-1, 1), axis=-1)[:, 0] - jax.nn.logsumexp(logits, axis=-1)
        return lp.reshape(yc.shape)

    if h.shape[0] == 1:  # one chunk: its logits are the peak either way, so recomputing them would only cost time
        return one(kernel, h[0], y[0])[:, :t]
    one = jax.checkpoint(one)  # the backward recomputes each chunk's logits instead of storing them all
    _, lp = jax.lax.scan(lambda c, xs: (c, one(kernel, *xs)), None, (h, y))  # [chunks, batch, ct]
    return lp.swapaxes(0, 1).reshape(b, -1)[:, :t]


def cross_entropy(cfg: ModelConfig, params, hidden, targets, weights, chunk: int = 2048):
    """(sum of weighted token losses, sum of weights): the caller divides once over all micro-batches."""
    lp = target_logprobs(cfg, params, hidden, targets, chunk)
    return -jnp.sum(lp * weights), jnp.sum(weights)


def dpo_loss(
    chosen_logp: jax.Array,  # [pairs] summed log-probs of the completion under the policy
    rejected_logp: jax.Array,
    ref_chosen_logp: jax.Array,  # [pairs] the same under the reference model
    ref_rejected_logp: jax.Array,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    weights: jax.Array | None = None,  # [pairs] 1 for real pairs, 0 for padding (metrics average over real ones)
    rpo_alpha: float = 0.0,
    chosen_tokens: jax.Array | None = None,  # [pairs] completion tokens of the chosen side (rpo_alpha > 0)
) -> tuple[jax.Array, dict]:
    """Per-pair DPO (sigmoid, with conservative label smoothing) or IPO loss, plus reward metrics.

    sigmoid: -(1-eps) log s(beta*m) - eps log s(-beta*m), m = (pi_c - ref_c) - (pi_r - ref_r)  (Rafailov et al.)
    ipo:     (m - 1/(2 beta))^2                                                          (Azar et al.)
    rpo_alpha > 0 adds rpo_alpha * (-pi_c / chosen_tokens): the chosen completion's per-token NLL (Pang et al.)
    """
    margin = (chosen_logp - ref_chosen_logp) - (rejected_logp - ref_rejected_logp)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * jax.nn.log_sigmoid(beta * margin) - label_smoothing * jax.nn.log_sigmoid(
            -beta * margin
        )
    elif loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"dpo loss_type {loss_type!r}: expected 'sigmoid' or 'ipo'")
    if rpo_alpha:
        if chosen_tokens is None:
            raise ValueError("dpo_loss: rpo_alpha > 0 needs chosen_tokens (the chosen completions' token counts)")
        losses = losses + rpo_alpha * (-chosen_logp / jnp.maximum(chosen_tokens, 1.0))
    chosen_reward = beta * (chosen_logp - ref_chosen_logp)
    rejected_reward = beta * (rejected_logp - ref_rejected_logp)
    w = jnp.ones_like(margin) if weights is None else weights
    mean = lambda x: jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)
    metrics = {
        "reward_margin": mean(chosen_reward - rejected_reward),
        "reward_accuracy": mean((chosen_reward > rejected_reward).astype(jnp.float32)),
        "chosen_reward": mean(chosen_reward),
        "rejected_reward": mean(rejected_reward),
    }
    return losses, metrics


# ---- online RL (task rl): the policy-gradient losses of the GRPO family -------------------------------------------
RL_LOSSES = ("grpo", "dr_grpo", "dapo", "gspo")


def policy_loss(
    logp: jax.Array,  # [rows, seq] log-probs of each target token under the policy being trained
    old_logp: jax.Array,  # [rows, seq] the same under the policy that sampled the rows (no gradient)
    advantages: jax.Array,  # [rows] one advantage per completion (group-relative)
    mask: jax.Array,  # [rows, seq] 1 where the target is a completion token, 0 for prompt and padding
    loss_type: str = "grpo",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ref_logp: jax.Array | None = None,  # [rows, seq] under the reference (kl_coef > 0)
    kl_coef: float = 0.0,
    max_new_tokens: int = 1,  # dr_grpo's constant normaliser
) -> tuple[jax.Array, jax.Array, dict]:
    """(loss sum, normaliser, metric sums) for one micro-batch: the loss is loss_sum / normaliser once summed over
    micro-batches (the train step divides once, so accumulation computes the same update as one big batch).

    Per token t of completion i, r = exp(logp - old_logp), A = advantages[i]:
      grpo, dr_grpo, dapo: l_it = -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) + kl_coef k3_it
        grpo:    sum_i (sum_t l_it / n_i) / rows    (n_i: completion i's tokens; rows with n_i = 0 count 0)
        dr_grpo: sum_i sum_t l_it / (rows x max_new_tokens)
        dapo:    sum_i sum_t l_it / sum_i n_i
      gspo: s_i = exp(sum_t (logp - old_logp) / n_i), l_i = -min(s_i A, clip(s_i, ...) A) + kl_coef mean_t k3_it,
        sum_i l_i / rows
    k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman's unbiased, positive KL estimator, as GRPO's paper).
    Metric sums (divided by the same normaliser by the caller): kl, clip_fraction (tokens, or gspo completions,
    whose ratio was clipped on the side the objective takes), ratio (mean token or sequence ratio)."""
    if loss_type not in RL_LOSSES:
        raise ValueError(f"rl.loss_type={loss_type!r}: expected one of {', '.join(RL_LOSSES)}")
    mask = mask.astype(jnp.float32)
    on = mask > 0  # outside the completion every difference is 0 before exp (no inf x 0 from a masked token)
    logp, old_logp = jnp.where(on, logp, 0.0), jnp.where(on, old_logp, 0.0)
    ref_logp = None if ref_logp is None else jnp.where(on, ref_logp, 0.0)
    n = jnp.sum(mask, axis=-1)  # [rows]
    has = (n > 0).astype(jnp.float32)
    per_tok_mean = lambda x: jnp.sum(x * mask, axis=-1) / jnp.maximum(n, 1.0)  # noqa: E731
    a = advantages.astype(jnp.float32)
    if ref_logp is not None and kl_coef:
        d = ref_logp - logp
        k3 = jnp.exp(d) - d - 1.0
    else:
        k3 = jnp.zeros_like(logp)
    if loss_type == "gspo":
        log_s = per_tok_mean(logp - old_logp)
        s = jnp.exp(log_s)
        clipped = jnp.clip(s, 1.0 - clip_low, 1.0 + clip_high)
        seq_loss = -jnp.minimum(s * a, clipped * a) + kl_coef * per_tok_mean(k3)
        was_clipped = ((s * a) > (clipped * a)).astype(jnp.float32)
        rows = jnp.sum(has)
        m = {"kl": jnp.sum(per_tok_mean(k3) * has), "clip_fraction": jnp.sum(was_clipped * has),
             "ratio": jnp.sum(s * has)}
        return jnp.sum(seq_loss * has), rows, m
    r = jnp.exp(logp - old_logp)
    clipped = jnp.clip(r, 1.0 - clip_low, 1.0 + clip_high)
    tok_loss = -jnp.minimum(r * a[:, None], clipped * a[:, None]) + kl_coef * k3
    was_clipped = ((r * a[:, None]) > (clipped * a[:, None])).astype(jnp.float32)
    if loss_type == "grpo":
        rows = jnp.sum(has)
        m = {"kl": jnp.sum(per_tok_mean(k3) * has), "clip_fraction": jnp.sum(per_tok_mean(was_clipped) * has),
             "ratio": jnp.sum(per_tok_mean(r) * has)}
        return jnp.sum(per_tok_mean(tok_loss) * has), rows, m
    tokens = jnp.sum(mask)
    m = {"kl": jnp.sum(k3 * mask), "clip_fraction": jnp.sum(was_clipped * mask), "ratio": jnp.sum(r * mask)}
    if loss_type == "dapo":
        return jnp.sum(tok_loss * mask), tokens, m
    # dr_grpo: a constant normaliser (rows x max_new_tokens); the metrics stay token means (m / tokens x rows)
    rows = jnp.asarray(mask.shape[0], jnp.float32)
    per_row = rows / jnp.maximum(tokens, 1.0)
    return jnp.sum(tok_loss * mask) / max_new_tokens, rows, {k: v * per_row for k, v in m.items()}
