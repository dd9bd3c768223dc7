"""Pictures of benchmark results (`gally bench --plot FILE.svg|png`, and a plot beside each --out
file), drawn with matplotlib (the `bench` extra): tokens/s per engine and test, with the spread
over repetitions as error bars; for --batch, tokens/s against the batch size; for --serve,
aggregate tokens/s and latency percentiles per server."""

from __future__ import annotations

import os


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'gally[bench]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".svg", ".png", ".pdf"):
        raise ValueError(f"--plot: {path!r} must end in .svg, .png or .pdf")
    fig.tight_layout()
    fig.savefig(path, dpi=150 if ext == ".png" else None)
    return path


def plot_results(res, path: str) -> str:
    """gally bench's rows: a panel per weight type, bars per test, one bar per engine and threads."""
    plt = _pyplot()
    rows = [r for r in res.rows if r.tok_s is not None]
    dtypes = list(dict.fromkeys(r.dtype for r in rows))
    fig, axes = plt.subplots(1, max(1, len(dtypes)), figsize=(5.5 * max(1, len(dtypes)), 4.2), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        mine = [r for r in rows if r.dtype == dtype]
        tests = list(dict.fromkeys(r.test.label + (" e2e" if r.engine == "gally generate" else "") for r in mine))
        series = list(dict.fromkeys((r.engine.replace(" generate", ""), r.threads) for r in mine))
        width = 0.8 / max(1, len(series))
        for k, (engine, threads) in enumerate(series):
            xs, ys, errs = [], [], []
            for i, test in enumerate(tests):
                r = next((r for r in mine if (r.engine.replace(" generate", ""), r.threads) == (engine, threads)
                          and r.test.label + (" e2e" if r.engine == "gally generate" else "") == test), None)
                if r is not None:
                    xs.append(i + k * width - 0.4 + width / 2)
                    ys.append(r.tok_s.mean)
                    errs.append(r.tok_s.std)
            ax.bar(xs, ys, width, yerr=errs, capsize=2, label=f"{engine} t{threads}")
        ax.set_xticks(range(len(tests)), tests, rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("tokens/s (log)")
        ax.set_title(dtype)
        ax.legend(fontsize=7)
    fig.suptitle(f"gally bench · {res.machine['cpu']['model']} · {res.date}", fontsize=9)
    return _save(fig, path)


def plot_batched(res, path: str) -> str:
    """--batch: aggregate decode and prefill tokens/s against the batch size, gally and the peer."""
    plt = _pyplot()
    fig, (dec, pre) = plt.subplots(1, 2, figsize=(10, 4))
    for key in dict.fromkeys((r.engine, r.dtype, r.threads) for r in res.rows):
        rows = sorted((r for r in res.rows if (r.engine, r.dtype, r.threads) == key), key=lambda r: r.batch)
        label = f"{key[0]} {key[1]} t{key[2]}"
        style = "-o" if key[0] == "gally" else "--s"
        dec.errorbar([r.batch for r in rows], [r.tg_tok_s.mean for r in rows], [r.tg_tok_s.std for r in rows],
                     fmt=style, capsize=2, label=label)
        pre.errorbar([r.batch for r in rows], [r.pp_tok_s.mean for r in rows], [r.pp_tok_s.std for r in rows],
                     fmt=style, capsize=2, label=label)
    for ax, what in ((dec, "decode, all sequences"), (pre, "prefill")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequences decoded together")
        ax.set_ylabel("tokens/s")
        ax.set_title(what)
        ax.legend(fontsize=7)
    fig.suptitle(f"gally bench --batch · prompts {res.prompt}, {res.gen} new tokens each · {res.date}", fontsize=9)
    return _save(fig, path)


def plot_load(rows: list[dict], path: str) -> str:
    """--serve: aggregate tokens/s, and TTFT / inter-token latency percentiles, per server and clients."""
    plt = _pyplot()
    fig, (tput, lat) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [f"{r['model']}\n{r['url'].split('//')[-1]}\nC={r['concurrency']}" for r in rows]
    tput.bar(range(len(rows)), [r["aggregate_tok_s"] for r in rows])
    tput.set_xticks(range(len(rows)), labels, fontsize=7)
    tput.set_ylabel("generated tokens/s, all clients")
    for i, (key, name) in enumerate((("ttft", "TTFT"), ("itl", "inter-token"))):
        for j, q in enumerate(("p50", "p99")):
            vals = [(r[f"{key}_{q}"] or 0) * 1e3 for r in rows]
            lat.bar([x + (2 * i + j) * 0.2 - 0.3 for x in range(len(rows))], vals, 0.2, label=f"{name} {q}")
    lat.set_xticks(range(len(rows)), labels, fontsize=7)
    lat.set_yscale("log")
    lat.set_ylabel("ms (log)")
    lat.legend(fontsize=7)
    fig.suptitle("gally bench --serve", fontsize=9)
    return _save(fig, path)


def beside(out_path: str) -> str:
    """The plot that goes with a result file: NAME.md → NAME.svg."""
    return os.path.splitext(out_path)[0] + ".svg"
