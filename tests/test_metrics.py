"""The FLOPs formula behind MFU, against closed forms."""
import qcjax
from qcjax.model import count_params
from qcjax.train.metrics import matmul_params, mfu, train_flops_per_token


def test_matmul_params_are_all_params_but_norms_biases_and_the_embedding_gather():
    for name in ("0.5b", "7b", "32b"):
        cfg = qcjax.get_config(name)
        e, d, L = cfg.hidden_size, cfg.dim_per_head, cfg.num_layers
        norms_biases = L * (2 * e + (cfg.num_heads + 2 * cfg.num_kv_heads) * d) + e
        embedding_gather = 0 if cfg.tie_word_embeddings else cfg.vocab_size * e  # tied: the table is the head
        assert matmul_params(cfg) + norms_biases + embedding_gather == count_params(cfg)


def test_train_flops_per_token_counts_causal_attention():
    cfg = qcjax.get_config("7b")
    t = 8192
    attn = train_flops_per_token(cfg, t) - 6 * matmul_params(cfg)
    # 3 (fwd+bwd) x 2 matmuls (QK^T, PV) x 2 FLOPs x heads x head_dim x (t+1)/2 average keys, per layer
    assert attn == 3 * 2 * 2 * cfg.num_heads * cfg.dim_per_head * (t + 1) / 2 * cfg.num_layers


def test_mfu_is_achieved_over_peak():
    cfg = qcjax.get_config("0.5b")
    f = train_flops_per_token(cfg, 2048)
    assert mfu(cfg, 2048, tokens_per_s=1e12 / f, n_devices=2, peak=1e12) == 0.5
    assert mfu(cfg, 2048, 1000.0, 1, None) is None
