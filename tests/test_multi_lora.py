"""Many LoRA adapters on one base (qcjax.row_lora, qcjax.inference.lora): one forward where each row runs through its
own adapter equals transformers + peft on each adapter (float32), the engine's greedy text per row equals the model
with that adapter merged into the base, however rows are batched and adapters swapped in and out of too few slots;
prefix-cache pages are never shared across adapters; adapters that do not fit are refused with one line."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qcjax import adapters, checkpoint, row_lora
from qcjax.config import Adaptation, LoraSpec, ModelConfig
from qcjax.inference import generate
from qcjax.inference.lora import Adapter, LoraSlots, read_adapter
from qcjax.model import build, init_params

from conftest import hf_logits, hf_model, params_from_hf, serving

CFG = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                  tie_word_embeddings=False, rope_theta=1e6, max_position_embeddings=64, dtype="float32",
                  param_dtype="float32")


def random_adapter(cfg: ModelConfig, rank: int, targets, seed: int, scale: float = 2.0) -> Adapter:
    rng = np.random.default_rng(seed)
    arrays = {}
    for t in targets:
        n_in, n_out = row_lora.target_dims(cfg, t)
        arrays[t] = {"a": rng.normal(0, 0.3, (cfg.num_layers, n_in, rank)).astype(np.float32),
                     "b": rng.normal(0, 0.3, (cfg.num_layers, rank, n_out)).astype(np.float32)}
    return Adapter(arrays, rank, scale, f"random-{seed}")


@pytest.fixture(scope="module")
def base():
    return jax.jit(lambda: init_params(CFG, jax.random.key(0)))()


def test_rows_with_their_own_adapters_equal_transformers_peft(tmp_path):
    """One batch: a row on PEFT adapter x (rank 4, q/v/o/down), a row on the base, a row on adapter y (rank 8, rsLoRA,
    every projection, layer 1 only): each row's logits equal transformers + peft with that adapter (float32)."""
    import peft
    import torch

    model = hf_model(CFG, seed=3)
    params = params_from_hf(CFG, model)
    specs = {"x": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
             "y": dict(r=8, lora_alpha=4, use_rslora=True, layers_to_transform=[1],
                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])}
    refs = {}
    for k, (name, spec) in enumerate(specs.items()):
        pm = peft.get_peft_model(hf_model(CFG, seed=3), peft.LoraConfig(task_type="CAUSAL_LM", **spec))
        with torch.no_grad():  # B starts at zero: make the adapters do something
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(k * 1000 + len(n))) * 0.2)
        pm.save_pretrained(tmp_path / name)
        refs[name] = pm.eval()
    slots = LoraSlots(CFG, max_loras=2, max_rank=8)
    for name in specs:
        slots.add(name, read_adapter(str(tmp_path / name), CFG))
    ids = jnp.asarray([slots.acquire("x"), -1, slots.acquire("y")], jnp.int32)
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (3, 9))

    @jax.jit
    def logits(params, bank, ids, tokens):
        with row_lora.applied(bank, ids):
            return build(CFG).apply({"params": params}, tokens)

    got = np.asarray(logits(params, slots.bank(), ids, jnp.asarray(tokens)))
    base = hf_logits(model, tokens)
    for row, ref in enumerate([hf_logits(refs["x"], tokens), base, hf_logits(refs["y"], tokens)]):
        tol = 1e-4 * np.abs(ref[row]).max()
        if row != 1:
            assert np.abs(ref[row] - base[row]).max() > 100 * tol  # the adapter changes the row
        np.testing.assert_allclose(got[row], ref[row], atol=tol, rtol=0, err_msg=f"row {row}")


def test_an_int8_base_takes_per_row_adapters_as_qlora_does(base):
    """Rows on an int8-quantized base, one with an adapter: its logits equal qwix's one-adapter QLoRA model (the
    same quantized base and adapter), the other row the quantized base's."""
    a = random_adapter(CFG, 4, ("q", "v", "down"), 7)
    qbase = adapters.quantize(CFG, base, "int8")
    qmodel = adapters.module_for(CFG, qbase)  # the tree says it is int8
    slots = LoraSlots(CFG, max_loras=1, max_rank=4, targets=a.targets)
    slots.add("a", a)
    ids = jnp.asarray([slots.acquire("a"), -1], jnp.int32)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, CFG.vocab_size, (2, 9)))

    @jax.jit
    def logits(params, bank, ids, tokens):
        with row_lora.applied(bank, ids):
            return qmodel.apply({"params": params}, tokens)

    got = np.asarray(logits(qbase, slots.bank(), ids, tokens))
    spec, tree = a.as_single()  # qwix's one-adapter QLoRA model on the same quantized base
    one = adapters.build(CFG, Adaptation(lora=spec, quant="int8"))
    qlora = np.asarray(jax.jit(lambda p, t: one.apply({"params": p}, t))(adapters.combine(qbase, tree), tokens))
    plain = np.asarray(jax.jit(lambda p, t: qmodel.apply({"params": p}, t))(qbase, tokens))
    tol = 1e-4 * np.abs(qlora).max()
    assert np.abs(qlora[0] - plain[0]).max() > 100 * tol
    np.testing.assert_allclose(got[0], qlora[0], atol=tol, rtol=0)
    np.testing.assert_allclose(got[1], plain[1], atol=tol, rtol=0)


def test_mixed_batches_and_evictions_give_each_merged_models_text(base):
    """Greedy text of 5 prompts over 3 adapters and the base, run together through 2 slots (adapters are evicted and
    copied back in), equals each prompt alone on the model with its adapter merged; an n-sample request shares
    pages within its adapter only."""
    ads = {"x": random_adapter(CFG, 4, ("q", "v"), 1), "y": random_adapter(CFG, 8, ("q", "v", "down"), 2),
           "z": random_adapter(CFG, 2, ("v", "down"), 3, scale=4.0)}
    slots = LoraSlots(CFG, max_loras=2, max_rank=8, targets=("q", "v", "down"))
    for n, a in ads.items():
        slots.add(n, a)
    rng = np.random.default_rng(0)
    shared = rng.integers(0, CFG.vocab_size, 20).tolist()
    prompts = [shared + [1], shared + [1], rng.integers(0, CFG.vocab_size, 9).tolist(), shared + [1], shared[:5]]
    names = ["x", "y", None, "z", "x"]
    stats: dict = {}
    out = generate(CFG, base, prompts, max_new_tokens=10, lora=slots, adapter=names, cache_dtype=jnp.float32,
                   max_rows=4, chunk=4, stats=stats)
    for p, n, o in zip(prompts, names, out):
        params = base if n is None else ads[n].merged_into(base)
        ref = generate(CFG, params, [p], max_new_tokens=10, cache_dtype=jnp.float32)[0]
        assert o.tokens == ref.tokens, n
        assert o.cached_tokens == 0  # the same 20-token prefix under x, y, z: never one adapter's pages for another
    assert slots.loads > 3  # 3 adapters through 2 slots: at least one was evicted and copied back in
    assert stats["cached_tokens"] == 0
    again = generate(CFG, base, [shared + [1]] * 2, max_new_tokens=4, lora=slots, adapter="x",
                     cache_dtype=jnp.float32, max_rows=1)
    assert again[1].cached_tokens == 16  # the same adapter's samples share its full pages


def test_adapters_on_a_tensor_parallel_mesh_give_one_devices_text(base):
    """The bank split over a tensor=2 mesh as the kernels are (qcjax.inference.lora.bank_shardings): mixed rows'
    greedy text equals the same requests on one device."""
    from qcjax.sharding import make_mesh

    ads = {"x": random_adapter(CFG, 4, ("q", "o", "gate"), 11), "y": random_adapter(CFG, 4, ("k", "v", "down"), 12)}
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, CFG.vocab_size, n).tolist() for n in (7, 12, 5)]
    names = ["x", None, "y"]

    def run(mesh):
        slots = LoraSlots(CFG, max_loras=2, max_rank=4, mesh=mesh)
        for n, a in ads.items():
            slots.add(n, a)
        out = generate(CFG, base, prompts, max_new_tokens=8, lora=slots, adapter=names, cache_dtype=jnp.float32,
                       mesh=mesh)
        return [o.tokens for o in out]

    mesh = make_mesh({"tensor": 2}, devices=jax.devices()[:2])
    one = run(None)
    assert run(mesh) == one
    plain = generate(CFG, base, prompts, max_new_tokens=8, cache_dtype=jnp.float32)
    assert one[0] != plain[0].tokens and one[2] != plain[2].tokens and one[1] == plain[1].tokens  # adapters acted


def test_the_slot_table_holds_adapters_in_use_and_evicts_least_recent():
    slots = LoraSlots(CFG, max_loras=2, max_rank=4, targets=("q",))
    for n in "abc":
        slots.add(n, random_adapter(CFG, 4, ("q",), ord(n)))
    sa, sb = slots.acquire("a"), slots.acquire("b")
    assert {sa, sb} == {0, 1} and slots.acquire("c") is None  # both slots held by running rows
    slots.release(sa)
    assert slots.acquire("c") == sa and slots.resident() == {"b": sb, "c": sa}  # a (free) was evicted
    assert slots.acquire("b") == sb and slots.loads == 3  # resident: no copy
    slots.remove("b")
    with pytest.raises(KeyError):
        slots.acquire("b")
    bank = slots.bank()
    np.testing.assert_array_equal(np.asarray(bank["q"]["a"][:, sa]), slots._padded(slots._adapters["c"][0])["q"]["a"])


def _peft_dir(path, **conf):
    from safetensors.numpy import save_file

    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, **conf}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((4, 64), np.float32),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((64, 4), np.float32)},
              str(path / "adapter_model.safetensors"))
    return str(path)


def test_adapters_that_do_not_fit_are_refused_with_one_line(tmp_path):
    slots = LoraSlots(CFG, max_loras=1, max_rank=4, targets=("q", "v"))
    cases = {
        "rank": (random_adapter(CFG, 8, ("q",), 0), "has rank 8; the server holds ranks up to 4"),
        "targets": (random_adapter(CFG, 4, ("q", "down"), 0), "adapts ['down']; the server's adapters target"),
    }
    for name, (a, msg) in cases.items():
        with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            slots.add(name, a)
    other = CFG.replace(hidden_size=96)
    with pytest.raises(ValueError, match=r"q_proj.lora_A.weight has shape \(4, 64\), the base needs \(4, 96\)"):
        read_adapter(_peft_dir(tmp_path / "small"), other)
    with pytest.raises(ValueError, match="use_dora=True is not served"):
        read_adapter(_peft_dir(tmp_path / "dora", use_dora=True), CFG)
    with pytest.raises(ValueError, match="no such directory"):
        read_adapter(str(tmp_path / "missing"), CFG)
    plain = tmp_path / "plain"
    checkpoint.save(str(plain), 1, init_params(CFG, jax.random.key(0)), CFG, async_=False).close()
    with pytest.raises(ValueError, match="a checkpoint without LoRA adapters"):
        read_adapter(str(plain), CFG)
    slots.add("ok", read_adapter(_peft_dir(tmp_path / "ok"), CFG))
    with pytest.raises(ValueError, match="'ok' is already loaded"):
        slots.add("ok", read_adapter(_peft_dir(tmp_path / "ok2"), CFG))


# ---- the server ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_server(tiny_hf, tok, tmp_path_factory):
    """`python -m qcjax.serve --lora py=<qcjax LoRA checkpoint> --lora rs=<PEFT dir> --max_loras 1` on the tiny HF
    model (one slot: the two adapters swap in and out), under uvicorn on 127.0.0.1; with the merged references."""
    from qcjax import loader
    from qcjax.peft_export import write_peft_dir
    from qcjax.serve.__main__ import build as build_server, build_parser
    from test_serve import KEY, Server

    hf_dir = tiny_hf[0]
    d = tmp_path_factory.mktemp("lora_server")
    cfg = loader.load_config(hf_dir)
    runs = {}
    for k, (name, spec) in enumerate({"py": LoraSpec(rank=4, alpha=8.0, targets=("q", "v", "o")),
                                      "rs": LoraSpec(rank=2, alpha=4.0, targets=("q", "v", "down"))}.items()):
        lad = Adaptation(lora=spec)
        tree = adapters.split(jax.jit(lambda: adapters.init_params(cfg, lad, jax.random.key(k + 1)))())[1]
        rng = np.random.default_rng(k)
        tree = jax.tree_util.tree_map_with_path(  # B starts at zero: as after some training
            lambda p, x: rng.normal(0, 0.3, x.shape).astype(x.dtype) if str(p[-1].key) == adapters.LORA_B else x,
            tree)
        if name == "py":  # a LoRA run's checkpoint, naming its base
            checkpoint.save(str(d / name), 7, tree, cfg, extra_config={"lora_base": {"init_from": hf_dir},
                                                                     "adaptation": lad.to_dict()}, async_=False).close()
        else:  # a PEFT directory
            write_peft_dir(str(d / name), cfg, spec, tree)
        runs[name] = (spec, tree)
    a = build_parser().parse_args(
        ["--hf_dir", hf_dir, "--dtype", "float32", "--cache_dtype", "float32", "--max_batch", "4", "--max_len", "64",
         "--chunk", "4", "--prefill_batch", "2", "--prefill_tokens", "64", "--api_key", KEY,
         "--lora", f"py={d / 'py'}", "--lora", f"rs={d / 'rs'}", "--max_loras", "1", "--lora_targets", "q,v,o,down"])
    logs: list[str] = []
    engine, app, name = build_server(a, log=logs.append)
    base = engine.params
    refs = {None: (engine.cfg, base), "py": loader.load(str(d / "py"))}  # the run's checkpoint, merged by the loader
    refs["rs"] = (engine.cfg, adapters.merge(runs["rs"][0], adapters.combine(base, runs["rs"][1])))
    with serving(app, engine) as port:
        yield Server(engine, name, port, tok), refs, d, logs


def _text(refs, name, tok, ids, max_new=10) -> str:
    cfg, params = refs[name]
    done = generate(cfg.replace(dtype="float32"), params, [ids], max_new_tokens=max_new,
                    stop_tokens=tok.fim_stop_ids, cache_dtype=jnp.float32)[0]
    return tok.decode(done.tokens)


def test_served_adapters_give_their_merged_models_text(lora_server, tok):
    """/v1/models lists the base and both adapters; concurrent requests naming py, rs and the base (one device slot:
    the adapters swap) each get the text of the model with that adapter merged (py: the loader's merge of the run's
    checkpoint); a model name nobody serves is a 404 in OpenAI's shape."""
    import concurrent.futures

    server, refs, _, logs = lora_server
    assert any("LoRA: 1 device slots of rank 4 over q,v,o,down" in m for m in logs)
    models = {m.id: m for m in server.client.models.list().data}
    assert list(models) == [server.name, "py", "rs"] and models["py"].parent == server.name
    prompt = "def quicksort(items):\n"
    ids = tok.encode_with_special(prompt)
    want = {n: _text(refs, n, tok, ids) for n in ("py", "rs", None)}
    assert len(set(want.values())) == 3  # each adapter changes the text

    def ask(n):
        r = server.client.completions.create(model=n or server.name, prompt=prompt, max_tokens=10, temperature=0)
        return r.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        got = list(pool.map(ask, ["py", "rs", None, "rs", "py", None]))
    assert got == [want[n] for n in ["py", "rs", None, "rs", "py", None]]
    status, body = server.post("/v1/completions", {"model": "nope", "prompt": prompt})
    assert status == 404 and body["error"]["code"] == "model_not_found" and "'py'" in body["error"]["message"]


def _post(server, path: str, body: dict) -> tuple[int, str]:
    """(status, body text): the adapter endpoints answer success in plain text, as vLLM's do, errors in JSON."""
    import urllib.error
    import urllib.request

    from test_serve import KEY

    req = urllib.request.Request(server.url + path, json.dumps(body).encode(),
                                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_adapters_load_and_unload_while_serving(lora_server, tok):
    """POST /v1/load_lora_adapter registers an adapter that requests can name at once (its text: the merged model's),
    /v1/unload_lora_adapter removes it (then a 404); bad paths and names are 4xx with one line; nothing compiles."""
    server, refs, d, _ = lora_server
    prompt = "import os\n"
    ids = tok.encode_with_special(prompt)
    status, text = _post(server, "/v1/load_lora_adapter", {"lora_name": "rs2", "lora_path": str(d / "rs")})
    assert status == 200 and "'rs2' added" in text
    r = server.client.completions.create(model="rs2", prompt=prompt, max_tokens=10, temperature=0)
    assert r.choices[0].text == _text(refs, "rs", tok, ids)
    assert [m.id for m in server.client.models.list().data] == [server.name, "py", "rs", "rs2"]
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "rs2"})[0] == 200
    status, body = server.post("/v1/completions", {"model": "rs2", "prompt": prompt})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "rs2"})[0] == 404
    status, body = server.post("/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(d / "missing")})
    assert status == 400 and "no such directory" in body["error"]["message"]
    status, body = server.post("/v1/load_lora_adapter", {"lora_name": server.name, "lora_path": str(d / "rs")})
    assert status == 400 and "base model's name" in body["error"]["message"]
    assert server.engine.stats()["compiles_after_warmup"] == 0
