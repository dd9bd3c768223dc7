"""Quality of gally's int8 / int4 / int4-v1 (and optionally llama.cpp's Q8_0 / Q4_0 / Q4_1 / Q4_K_M)
on weights that do not already lie on a 4-bit grid.

The default model's layers come from a Q4_1 GGUF, so int4-v1 (Q4_1's layout) would reproduce them
exactly. This script first makes a "dithered" f32 copy: each layer matrix (q/k/v/o, gate/up/down)
gets Gaussian noise of `--dither` × its row's standard deviation (embeddings and norms kept). That
copy is the base; each quantized copy of it is compared with it on a text by the perplexity
protocol (windows of --ctx tokens, second halves scored): KL(P_base ‖ P_quant) per token (mean,
p99), the share of tokens whose top choice is the base's, and perplexity.

    python bench/quant_quality.py --text ../shared/reference/how-llms-work.txt \\
        [--model smollm2-135m-instruct] [--work /tmp/gally-quant-quality] \\
        [--llama-cpp-bin /work/dl/llama.cpp-native/bin]

With --llama-cpp-bin (llama-quantize, llama-perplexity), the dithered weights are also written as
an F32 GGUF (the keys, tokenizer included, copied from the GGUF the model came from: --gguf),
quantized by llama-quantize with its default choices per type and measured by `llama-perplexity
--kl-divergence` against the F32 file's logits (llama.cpp's own tokenization and protocol, which
adds BOS: compare its rows with each other, and gally's with gally's). Prints a markdown table;
--json writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np

import gally
from gally import cache, perplexity, quantize, safetensors_file, sources
from gally.dtypes import as_float32

LAYER = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")
# int4-pure: `gally quantize --to int4 --pure`; int4-uncalibrated: `--no-calibration` (every input column alike)
GALLY_KINDS = ("int8", "int4", "int4-pure", "int4-uncalibrated", "int4-v1")
# llama-quantize's default choices per tensor: on SmolLM2, whose rows of 576 are no multiple of
# the k-quants' 256, Q4_K_S and Q4_K_M store q/k/v/o/gate/up as Q5_0 (its fallback) and only
# down_proj (1536 inputs) as Q4_K (Q4_K_M: v_proj Q8_0 and down_proj Q6_K in 14 of the 30 layers).
LLAMA_KINDS = ("Q8_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0")


def dithered_folder(source: str, out: str, dither: float, seed: int) -> str:
    """`source`'s weights in f32 with every layer matrix w[r] += N(0, (dither · std(w[r]))²)."""
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, t in sorted(safetensors_file.open_checkpoint(source).items()):
        w = as_float32(t.dtype, t.numpy())
        if LAYER.fullmatch(name):
            std = w.std(axis=1, keepdims=True)
            w = (w + rng.standard_normal(w.shape, dtype=np.float32) * (dither * std)).astype(np.float32)
        tensors[name] = ("F32", np.ascontiguousarray(w, np.float32))
    tmp = out + ".part"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for f in os.listdir(source):
        if f.endswith((".json", ".jinja", ".txt")) and f != "model.safetensors.index.json":
            shutil.copyfile(os.path.join(source, f), os.path.join(tmp, f))
    safetensors_file.write_file(os.path.join(tmp, "model.safetensors"), tensors, {})
    os.replace(tmp, out)
    return out


def gally_rows(base_folder: str, work: str, text: str, ctx: int, threads: int) -> list[dict]:
    base = gally.load(base_folder, threads=threads)
    rows = []
    for kind in GALLY_KINDS:
        folder = os.path.join(work, f"gally-{kind}")
        start = time.perf_counter()
        if not os.path.isdir(folder):
            quantize.quantize_folder(base_folder, folder, kind.split("-")[0] if kind != "int4-v1" else kind,
                                     pure=kind.endswith("-pure"),
                                     calibration=None if kind.endswith("-uncalibrated") else "self")
        made = time.perf_counter() - start
        bits = quantize.bits_per_weight(quantize.read_checkpoint(folder))
        layers_bpw, model_bpw = bits["layers"], bits["model"]
        model = gally.load(folder, threads=threads)
        r = perplexity.kl_divergence(base, model, text, ctx=ctx)
        rows.append({"engine": "gally", "type": kind, "layers_bpw": layers_bpw, "model_bpw": model_bpw,
                     "quantize_s": made, **r})
        print(f"gally {kind}: {rows[-1]}", file=sys.stderr)
    return rows


def gguf_like(template: str, folder: str, out: str) -> None:
    """An F32 GGUF of `folder`'s weights with every key of `template` (the GGUF the folder came from:
    its tokenizer, hyperparameters, chat template), tensors in llama.cpp's names and q/k row order."""
    import gguf

    from gally.gguf_names import hf_name, permute_rows, permuted_heads

    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    reader = gguf.GGUFReader(template)
    arch = str(reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(out + ".part", arch)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        value = 0 if field.name == "general.file_type" else field.contents()  # 0: LLAMA_FTYPE_ALL_F32
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub)
    tensors = safetensors_file.open_checkpoint(folder)
    for t in reader.tensors:
        name = hf_name(t.name)
        w = as_float32(tensors[name].dtype, tensors[name].numpy())
        heads = permuted_heads(arch, name, cfg)
        writer.add_tensor(t.name, np.ascontiguousarray(permute_rows(w, heads) if heads else w, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(out + ".part", out)


def gguf_bits_per_weight(path: str) -> tuple[float, float]:
    """Bits per weight of a GGUF's layer matrices (blk.N.*, 2-D) and of all its tensors."""
    import gguf

    layer_bits = layer_n = bits = n = 0
    for t in gguf.GGUFReader(path).tensors:
        bits += 8 * int(t.n_bytes)
        n += int(t.n_elements)
        if t.name.startswith("blk.") and len(t.shape) == 2 and t.shape[1] > 1:
            layer_bits += 8 * int(t.n_bytes)
            layer_n += int(t.n_elements)
    return layer_bits / layer_n, bits / n


def llama_rows(base_folder: str, work: str, text_path: str, ctx: int, threads: int, template: str,
               bin_dir: str) -> list[dict]:
    f32 = os.path.join(work, "dithered-F32.gguf")
    if not os.path.isfile(f32):
        gguf_like(template, base_folder, f32)
    name = os.path.splitext(os.path.basename(text_path))[0]
    logits = os.path.join(work, f"dithered-F32-{name}-{ctx}.kld")  # the base's logits on this text
    # -nr: no weight repacking, which on CPUs reporting AMX routes Q8_0/Q4 matmuls to a backend that crashed here
    common = ["-f", text_path, "-c", str(ctx), "-t", str(threads), "-nr"]
    if not os.path.isfile(logits):
        subprocess.run([os.path.join(bin_dir, "llama-perplexity"), "-m", f32, *common, "--kl-divergence-base",
                        logits], check=True, capture_output=True)
    rows = []
    for kind in LLAMA_KINDS:
        path = os.path.join(work, f"dithered-{kind}.gguf")
        if not os.path.isfile(path):
            subprocess.run([os.path.join(bin_dir, "llama-quantize"), f32, path, kind], check=True,
                           capture_output=True)
        p = subprocess.run([os.path.join(bin_dir, "llama-perplexity"), "-m", path, *common, "--kl-divergence-base",
                            logits, "--kl-divergence"], check=True, capture_output=True, text=True)
        out = p.stdout + p.stderr

        def grab(label, text=out):  # the summary's line (the last): the chunk table's header names the same
            found = re.findall(label + r"\s*:\s*([-0-9.e]+)", text)
            return float(found[-1]) if found else float("nan")

        layers_bpw, model_bpw = gguf_bits_per_weight(path)
        rows.append({"engine": "llama.cpp", "type": kind, "layers_bpw": layers_bpw, "model_bpw": model_bpw,
                     "kld_mean": grab(r"Mean\s+KLD"), "kld_p99": grab(r"99\.0%\s+KLD"),
                     "same_top": grab(r"Same top p") / 100, "ppl_base": grab(r"Mean PPL\(base\)"),
                     "ppl": grab(r"Mean PPL\(Q\)")})
        print(f"llama.cpp {kind}: {rows[-1]}", file=sys.stderr)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| engine | type | bits/weight (layers) | bits/weight (model) | PPL | PPL vs base | KLD mean | KLD p99 "
             "| same top |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['type']} | {r['layers_bpw']:.2f} | {r['model_bpw']:.2f} | {r['ppl']:.4f} "
                     f"| {100 * (r['ppl'] / r['ppl_base'] - 1):+.2f}% | {r['kld_mean']:.5f} | {r['kld_p99']:.4f} "
                     f"| {100 * r['same_top']:.2f}% |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text", required=True, help="the perplexity text")
    p.add_argument("--model", default=None, help="model folder or alias (default: gally's default model)")
    p.add_argument("--work", default="/tmp/gally-quant-quality", help="folder for the dithered and quantized copies")
    p.add_argument("--dither", type=float, default=0.1, help="noise std as a fraction of each row's std")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--gguf", default=None, help="the GGUF the model came from, whose keys the F32 GGUF of the "
                   "dithered weights copies (default: gally's cached download of the default model)")
    p.add_argument("--llama-cpp-bin", default=None, help="folder with llama-quantize and llama-perplexity")
    p.add_argument("--engines", default="gally,llama.cpp", help="which rows to measure (gally, llama.cpp)")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    os.makedirs(args.work, exist_ok=True)
    base = dithered_folder(sources.resolve(args.model), os.path.join(args.work, "dithered-f32"), args.dither,
                           args.seed)
    engines = args.engines.split(",")
    rows = gally_rows(base, args.work, text, args.ctx, args.threads) if "gally" in engines else []
    template = args.gguf or os.path.join(cache.home(), "gguf", "SmolLM2-135M-Instruct.Q4_1.gguf")
    if "llama.cpp" in engines and args.llama_cpp_bin:
        rows += llama_rows(base, args.work, args.text, args.ctx, args.threads, template, args.llama_cpp_bin)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
