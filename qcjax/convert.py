"""Convert Qwen2.5-Coder weights between Hugging Face directories and qcjax Orbax checkpoints, streaming.

    python -m qcjax.convert hf-to-orbax --hf_dir DIR --out CKPT [--dtype bfloat16]
    python -m qcjax.convert orbax-to-hf --ckpt CKPT --out DIR [--dtype bfloat16] [--tokenizer_dir DIR]
    python -m qcjax.convert orbax-to-hf --ckpt LORA_CKPT [--out DIR --merge_lora] [--peft_dir DIR]

Both directions hold one param (one stacked layer tensor) in memory at a time, and write into a temporary sibling
directory that is renamed into place only when complete. A LoRA run's checkpoint holds the adapters alone: it is
exported merged into its base (--merge_lora: the whole merged model is in memory) and/or as PEFT adapters
(--peft_dir). The library functions are `hf_to_orbax` and `orbax_to_hf`; to start training or inference from
either format without converting, use `qcjax.load_hf(dir, mesh=...)` or `qcjax.checkpoint.restore_params(ckpt,
mesh=...)`.
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Any, Sequence

from qcjax import cli, paths
from qcjax.cli import parse_mesh
from qcjax.config import Adaptation, ModelConfig, adaptation_from_dict, get_config

DTYPES = ("float32", "bfloat16", "float16")


def hf_to_orbax(
    hf_dir: str,
    ckpt_dir: str,
    *,
    dtype: str | None = None,
    mesh: Any = None,
    expect: ModelConfig | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> ModelConfig:
    """HF directory -> a qcjax checkpoint (step 0: params + config). Returns the model config.

    dtype: param dtype (default float32, the training master-weight dtype). mesh: each param is put straight into
    its sharding on this mesh before it is saved (default: all devices on the fsdp axis). expect: the config the
    HF files must match. ckpt_dir must be absent or empty unless overwrite.
    """
    import jax
    from flax import linen as nn

    from qcjax import checkpoint, hf
    from qcjax.model import abstract_params
    from qcjax.sharding import make_mesh, param_shardings

    cfg = ModelConfig.from_hf_json(hf_dir, **({"param_dtype": dtype} if dtype else {}))
    if expect is not None:
        hf.check_same_model(cfg, expect, paths.join(hf_dir, "config.json"))
    reader = hf.SafetensorsReader(hf_dir)
    hf.check_names(cfg, reader.names())  # before anything is written
    boxed = abstract_params(cfg)
    abstract = nn.meta.unbox(boxed)
    shardings = param_shardings(boxed, mesh if mesh is not None else make_mesh())
    rows = {row[1]: row for row in hf.mapping(cfg)}

    def get_leaf(path: tuple[str, ...]) -> jax.Array:
        x = hf.param_from_hf(cfg, rows[path], hf._get_path(abstract, path), reader.get, reader.release)
        return jax.device_put(x, hf._get_path(shardings, path))  # aliases x on one CPU device; else one copy

    source = {"source": {"format": "huggingface", "hf_dir": paths.absolute(hf_dir)}}
    with hf.atomic_dir(ckpt_dir, overwrite) as tmp:
        checkpoint.save_params_streaming(tmp, cfg, list(rows), get_leaf, step=0, extra_config=source,
                                         progress=progress)
    return cfg


def orbax_to_hf(
    ckpt_dir: str,
    out_dir: str | None,
    *,
    step: int | None = None,
    dtype: str | None = None,
    merge_lora: bool = False,
    peft_dir: str | None = None,
    tokenizer_dir: str | None = None,
    max_shard_size: int = 5 * 10**9,
    torch_bin: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> ModelConfig:
    """A qcjax checkpoint (converted or full training state; default latest step) -> an HF directory that
    `transformers.AutoModelForCausalLM.from_pretrained` loads. Returns the checkpoint's model config (a LoRA
    checkpoint's adaptation: `qcjax.loader.load_adaptation`).

    dtype: tensor dtype of the output (default: the checkpoint's param dtype).
    tokenizer_dir: whose tokenizer files the export gets; default the training run's own tokenizer (a SentencePiece
    run's spm.model, a tokenizer.json: `run_tokenizer_dir`), so the export samples with no --tokenizer.
    ckpt_dir may be a training run's directory, its checkpoints/ or one step (qcjax.loader.resolve_checkpoint).
    A LoRA training checkpoint holds the adapters alone: merge_lora writes them folded into the base it names
    (computed in float32 from the base as training saw it: dequantized under QLoRA), and peft_dir writes them in
    PEFT's adapter layout (qcjax.peft_export; no base is read when out_dir is None). The options and outputs are
    checked before any weights are read.
    """
    from qcjax import checkpoint, hf
    from qcjax.loader import resolve_checkpoint

    ckpt_dir, step = resolve_checkpoint(ckpt_dir, step)
    reader = checkpoint.ParamsReader(ckpt_dir, step)
    cfg = reader.config
    ad = adaptation_from_dict(reader.meta)
    _check_lora_outputs(ckpt_dir, ad, out_dir, merge_lora, peft_dir)
    for d in (out_dir, peft_dir):
        if d is not None:
            hf.check_output(d, overwrite)
    out_dtype = dtype or cfg.param_dtype
    if tokenizer_dir is None and out_dir is not None:
        tokenizer_dir = run_tokenizer_dir(ckpt_dir, reader.step)
    if ad.lora is None:
        hf.write_hf_dir(out_dir, cfg, reader, dtype=out_dtype, max_shard_size=max_shard_size,
                        tokenizer_dir=tokenizer_dir, torch_bin=torch_bin, overwrite=overwrite, progress=progress)
        return cfg
    from qcjax import adapters, peft_export
    from qcjax.loader import load

    base_of = reader.meta.get("lora_base")
    base_model = (base_of.get("init_from") or None) if isinstance(base_of, dict) else None
    if out_dir is None:  # the adapters alone
        lora_cfg, lora = checkpoint.restore_params(ckpt_dir, reader.step)
        peft_export.write_peft_dir(peft_dir, lora_cfg, ad.lora, lora, base_model=base_model, dtype=out_dtype,
                                   overwrite=overwrite)
        return cfg
    lora_cfg, full = load(ckpt_dir, step=reader.step, dtype="float32", merge_lora=False)  # the merge runs in float32
    if peft_dir is not None:
        peft_export.write_peft_dir(peft_dir, lora_cfg, ad.lora, adapters.split(full)[1], base_model=base_model,
                                   dtype=out_dtype, overwrite=overwrite)
    merged = adapters.merge(ad.lora, full)
    del full
    hf.save_hf(out_dir, lora_cfg, merged, dtype=out_dtype, max_shard_size=max_shard_size, tokenizer_dir=tokenizer_dir,
               torch_bin=torch_bin, overwrite=overwrite, progress=progress)
    return cfg


def run_tokenizer_dir(ckpt_dir: str, step: int | None = None) -> str | None:
    """The directory holding a checkpoint's own tokenizer files (qcjax.loader.checkpoint_tokenizer: the one training
    recorded, or the run's tokenizer/; "qwen": the real Qwen tokenizer.json's package directory), or None when there
    is none to copy."""
    from qcjax.hf import TOKENIZER_FILES
    from qcjax.loader import checkpoint_tokenizer
    from qcjax.tokenizer import qwen_tokenizer_json

    src = checkpoint_tokenizer(ckpt_dir, step) or str(ckpt_dir)
    if src == "qwen":
        src = qwen_tokenizer_json()
        if src is None:
            return None
    folder = src if paths.isdir(src) else paths.dirname(src)
    wanted = [f for f in TOKENIZER_FILES if f != "generation_config.json"]
    return folder if any(paths.isfile(paths.join(folder, f)) for f in wanted) else None


def _check_lora_outputs(ckpt_dir: str, ad: Adaptation, out_dir: str | None, merge_lora: bool,
                        peft_dir: str | None) -> None:
    """What a checkpoint can be exported as: a LoRA checkpoint (adapters only) merged and/or as PEFT adapters, any
    other as it is. A mismatch is a one-line ValueError naming the option (its CLI flag in brackets)."""
    if ad.lora is None:
        if merge_lora or peft_dir is not None:
            flag = "merge_lora (--merge_lora)" if merge_lora else "peft_dir (--peft_dir)"
            raise ValueError(f"{ckpt_dir} is not a LoRA checkpoint (it holds a whole model, no adapters): drop {flag}")
        if out_dir is None:
            raise ValueError("no output: give out_dir (--out)")
        return
    if out_dir is not None and not merge_lora:
        raise ValueError(f"{ckpt_dir} is a LoRA checkpoint (adapters only): pass merge_lora=True (--merge_lora) to "
                         f"write them merged into their base, or peft_dir (--peft_dir DIR) for PEFT's adapter layout")
    if out_dir is None and merge_lora:
        raise ValueError("merge_lora (--merge_lora) writes the merged model to out_dir (--out): give it")
    if out_dir is None and peft_dir is None:
        raise ValueError(f"{ckpt_dir} is a LoRA checkpoint: give out_dir (--out) with merge_lora (--merge_lora), "
                         f"and/or peft_dir (--peft_dir)")
    if out_dir is not None and peft_dir is not None and paths.absolute(out_dir) == paths.absolute(peft_dir):
        raise ValueError(f"out_dir (--out) and peft_dir (--peft_dir) are one directory, {paths.absolute(out_dir)}: "
                         f"give two")


# ---- CLI ----------------------------------------------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 (KB/MB/GB are powers of 10 as in transformers; KiB/MiB/GiB powers of 2)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 5GB, 500MB or 1000000")
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return size


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m qcjax.convert",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  python -m qcjax.convert hf-to-orbax --hf_dir Qwen2.5-Coder-7B --out ckpt/7b --dtype bfloat16\n"
        "  python -m qcjax.convert orbax-to-hf --ckpt runs/sft/checkpoints --out export/7b-sft \\\n"
        "      --dtype bfloat16 --tokenizer_dir Qwen2.5-Coder-7B\n"
        "  python -m qcjax.convert orbax-to-hf --ckpt runs/lora/checkpoints --out export/7b-lora --merge_lora \\\n"
        "      --peft_dir export/7b-lora-peft --dtype bfloat16\n"
        "run `python -m qcjax.convert COMMAND --help` for each command's options",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{hf-to-orbax,orbax-to-hf}")

    a = sub.add_parser(
        "hf-to-orbax",
        help="HF directory (config.json + safetensors) -> qcjax Orbax checkpoint",
        description="Read an HF Qwen2ForCausalLM directory (model.safetensors, or model-0000k-of-0000n.safetensors "
        "with model.safetensors.index.json; tied checkpoints without lm_head.weight are fine) and write a qcjax "
        "checkpoint: step 0 with the params in the scanned layout and the model config in its metadata, the same "
        "layout training saves, so training, inference and orbax-to-hf need no other file.",
    )
    a.add_argument("--hf_dir", required=True, help="HF model directory with config.json and *.safetensors")
    a.add_argument("--out", required=True, help="checkpoint directory to create (must be absent or empty)")
    a.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="param dtype stored in the checkpoint (default float32, the training master weights; "
                   "bfloat16 halves the size and is exact for bf16 hub checkpoints)")
    a.add_argument("--model", default=None,
                   help="a preset name (0.5b ... 32b); refuse unless config.json describes this model")
    a.add_argument("--mesh", type=parse_mesh, default=None,
                   help="mesh to place params on before saving, e.g. fsdp=8 or fsdp=4,tensor=2 "
                   "(default: every device on fsdp)")

    b = sub.add_parser(
        "orbax-to-hf",
        help="qcjax Orbax checkpoint (converted or training) -> HF directory transformers can load",
        description="Read the params (and model config) of a qcjax checkpoint, converted or a full training "
        "checkpoint, and write an HF directory: config.json (Qwen2ForCausalLM, every rope/YaRN field, "
        "tie_word_embeddings), generation_config.json, safetensors shards with model.safetensors.index.json, "
        "tokenizer files if given, and optionally pytorch_model*.bin. A LoRA run's checkpoint (adapters only) "
        "needs --merge_lora (the adapters folded into the base the checkpoint names, in float32; a QLoRA run's "
        "from its dequantized base) and/or --peft_dir (the adapters as PEFT loads them).",
    )
    b.add_argument("--ckpt", required=True, help="qcjax checkpoint: a training run's directory, its checkpoints/, "
                   "one step directory of it, or a converted checkpoint")
    b.add_argument("--out", default=None,
                   help="HF directory to create (must be absent or empty); required unless --peft_dir alone")
    b.add_argument("--merge_lora", action="store_true",
                   help="LoRA checkpoints: write --out as the base with the adapters merged in (a plain model)")
    b.add_argument("--peft_dir", default=None,
                   help="LoRA checkpoints: also (or, without --out, only) write the adapters here in PEFT's layout: "
                   "adapter_config.json + adapter_model.safetensors for PeftModel.from_pretrained(base, DIR)")
    b.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    b.add_argument("--dtype", choices=DTYPES, default=None,
                   help="tensor dtype of the output (default: the checkpoint's param dtype)")
    b.add_argument("--tokenizer_dir", default=None,
                   help="copy tokenizer.json, tokenizer_config.json, vocab.json, merges.txt, spm.model, ... from "
                   "here (e.g. the original HF directory; its generation_config.json, with the instruct models' "
                   "<|im_end|> stop id, replaces the default one); default: the training run's own tokenizer, "
                   "where the checkpoint names one")
    b.add_argument("--max_shard_size", type=parse_size, default=5 * 10**9,
                   help="largest safetensors shard, e.g. 5GB (default), 500MB, 2GiB")
    b.add_argument("--torch_bin", action="store_true",
                   help="also write pytorch_model*.bin (a PyTorch state dict per shard; needs torch)")

    for q, outs in ((a, "--out"), (b, "--out (and --peft_dir)")):
        q.add_argument("--overwrite", action="store_true", help=f"replace {outs} if it exists and is not empty")
        q.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.start()  # before JAX starts
    progress = not args.no_progress
    try:
        if args.command == "hf-to-orbax":
            mesh = None
            if args.mesh is not None:
                from qcjax.sharding import make_mesh

                mesh = make_mesh(args.mesh)
            expect = get_config(args.model) if args.model else None
            cfg = hf_to_orbax(args.hf_dir, args.out, dtype=args.dtype, mesh=mesh, expect=expect,
                              overwrite=args.overwrite, progress=progress)
        else:
            cfg = orbax_to_hf(args.ckpt, args.out, step=args.step, dtype=args.dtype, merge_lora=args.merge_lora,
                              peft_dir=args.peft_dir, tokenizer_dir=args.tokenizer_dir,
                              max_shard_size=args.max_shard_size, torch_bin=args.torch_bin,
                              overwrite=args.overwrite, progress=progress)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"qcjax.convert {args.command}: error: {e}", file=sys.stderr)
        return 1
    for line in _summary(args, cfg):
        print(line)
    return 0


def _summary(args: argparse.Namespace, cfg: ModelConfig) -> list[str]:
    """What was written, one line per output; a LoRA export says what it merged or holds, QLoRA's base included."""
    model = (f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, "
             f"{'tied' if cfg.tie_word_embeddings else 'untied'}")
    from qcjax.loader import load_adaptation

    ad = load_adaptation(args.ckpt, args.step)
    if ad.lora is None:
        return [f"wrote {paths.absolute(args.out)} ({model})"]
    lo = ad.lora
    adapters = (f"rank-{lo.rank} adapters ({','.join(lo.targets)}; alpha {lo.alpha:g}; "
                f"{'layers ' + ','.join(map(str, lo.layers)) if lo.layers is not None else 'every layer'})")
    base = f"the dequantized {ad.quant} base (QLoRA)" if ad.quant != "none" else "the base"
    lines = []
    if args.out is not None:
        lines.append(f"wrote {paths.absolute(args.out)} ({model}): {adapters} merged into {base} in float32")
    if args.peft_dir is not None:
        note = f"; trained on the {ad.quant}-quantized base, PEFT applies them to the float one" \
            if ad.quant != "none" else ""
        lines.append(f"wrote {paths.absolute(args.peft_dir)} (PEFT LoRA: {adapters}{note})")
    return lines


if __name__ == "__main__":
    sys.exit(main())
