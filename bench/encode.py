"""Encoding benchmark: layertap.encode vs a plain scikit-learn RidgeCV(alpha_per_target=True) loop.

    .venv/bin/python bench/encode.py                       # 1,000 stimuli x 10,000 targets x 4,096 features
    .venv/bin/python bench/encode.py --targets 2000 --also-torch --threads 1 --append   # smaller; torch backend too

Both contenders run side by side in this process on the same data and the same outer folds
(sklearn KFold(5, shuffle=True, random_state=SEED), checked against layertap's manifest), with the
same alpha grid; each z-scores features with training-fold statistics, fits ridge with one alpha per
target chosen inside the training stimuli only (scikit-learn: efficient leave-one-out; layertap:
himalaya's inner 5-fold), predicts the held-out fold and scores Pearson r per target, averaged
over folds. The timed work is one layer: reading nothing from disk (features are in memory), all
folds, all targets. Prints the CPU model and SIMD flags from /proc/cpuinfo beside the numbers;
``--append`` adds a section to bench/RESULTS.md.

Data: features = 50 latent factors x random loadings + unit noise (float32); responses = latent
factors x random weights (signal sd 0.1-1, so the SNR varies over targets) + unit noise.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def cpu_info() -> tuple[str, list[str]]:
    """CPU model name and flags from /proc/cpuinfo (platform's strings elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), []
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.M)
    return (model.group(1).strip() if model else platform.machine()), (flags.group(1).split() if flags else [])


SIMD = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
        "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")


def pearson_columns(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    pc, yc = pred - pred.mean(0), y - y.mean(0)
    return (pc * yc).sum(0) / np.sqrt((pc * pc).sum(0) * (yc * yc).sum(0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stimuli", type=int, default=1000)
    ap.add_argument("--targets", type=int, default=10000)
    ap.add_argument("--features", type=int, default=4096)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--alphas", default="1e-2:1e5:15")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--also-torch", action="store_true", help="also time himalaya's torch (CPU) backend")
    ap.add_argument("--threads", type=int, default=None,
                    help="BLAS/torch threads for both contenders (threadpoolctl; default: the libraries')")
    ap.add_argument("--append", action="store_true", help="append a section to bench/RESULTS.md")
    args = ap.parse_args()
    warnings.simplefilter("ignore", UserWarning)

    import sklearn
    import torch
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold
    from sklearn.preprocessing import StandardScaler

    import layertap as lt
    from layertap.encode.ridge import parse_alphas

    model, flags = cpu_info()
    simd = [f for f in SIMD if f in flags]
    n, p, t = args.stimuli, args.features, args.targets
    print(f"CPU: {model}; {os.cpu_count()} logical cores; SIMD flags: {' '.join(simd) or 'n/a'}", flush=True)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), scikit-learn {sklearn.__version__}, "
          f"numpy {np.__version__}", flush=True)
    rng = np.random.default_rng(args.seed)
    z = rng.standard_normal((n, 50))
    x = (z @ rng.standard_normal((50, p)) + rng.standard_normal((n, p))).astype(np.float32)
    y = (z @ rng.standard_normal((50, t)) * np.linspace(0.1 / np.sqrt(50), 1 / np.sqrt(50), t)
         + rng.standard_normal((n, t))).astype(np.float32)
    ids = [f"stim{i:05d}" for i in range(n)]
    grid = parse_alphas(args.alphas)
    splits = list(KFold(args.folds, shuffle=True, random_state=args.seed).split(x))
    print(f"data: {n} stimuli x {t} targets x {p} features, {args.folds} folds, {len(grid)} alphas", flush=True)

    results: dict[str, dict[str, object]] = {}
    from threadpoolctl import threadpool_limits

    limit = threadpool_limits(limits=args.threads) if args.threads else None
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = ["numpy", "torch"] if args.also_torch else ["numpy"]
    for backend in backends:
        w0, c0 = time.perf_counter(), time.process_time()
        scores = lt.encode({"layer": x}, y, stimuli=ids, images=ids, folds=args.folds, alphas=grid, seed=args.seed,
                           backend=backend, progress=False, n_bootstrap=0)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        tested = scores.manifest["folds"]["test_stimuli"]
        assert tested == [[ids[i] for i in te] for _, te in splits], "layertap used other folds"
        r = scores.to_pandas(wide=True)["r"].to_numpy()
        name = f"layertap (himalaya {backend} backend)"
        results[name] = {"wall": wall, "cpu": cpu, "layer_s": scores.manifest["layers"]["layer"]["seconds"], "r": r,
                         "solver": scores.manifest["layers"]["layer"]["solver"]}
        print(f"{name}: {wall:.1f} s wall ({cpu:.1f} s CPU), {results[name]['solver']} solver, mean r {r.mean():.4f}",
              flush=True)

    w0, c0 = time.perf_counter(), time.process_time()
    r_sum = np.zeros(t)
    for train, test in splits:
        sc = StandardScaler().fit(x[train])
        m = RidgeCV(alphas=grid, alpha_per_target=True).fit(sc.transform(x[train]), y[train])
        r_sum += pearson_columns(m.predict(sc.transform(x[test])), y[test].astype(np.float64))
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    r_ref = r_sum / len(splits)
    results["scikit-learn RidgeCV(alpha_per_target=True)"] = {"wall": wall, "cpu": cpu, "layer_s": wall, "r": r_ref}
    print(f"scikit-learn: {wall:.1f} s wall ({cpu:.1f} s CPU), mean r {r_ref.mean():.4f}", flush=True)
    if limit is not None:
        limit.restore_original_limits()

    lines = ["| contender | s per layer (wall) | CPU s | speed-up vs sklearn | mean r | median abs Δr vs sklearn "
             "| max abs Δr | corr(r, r_sklearn) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    base = results["scikit-learn RidgeCV(alpha_per_target=True)"]["wall"]
    for name, res in results.items():
        d = np.abs(res["r"] - r_ref)
        lines.append(f"| {name} | {res['wall']:.1f} | {res['cpu']:.1f} | {base / res['wall']:.2f}x | "
                     f"{res['r'].mean():.4f} | {np.median(d):.2e} | {d.max():.2e} | "
                     f"{np.corrcoef(res['r'], r_ref)[0, 1]:.6f} |")
    table = "\n".join(lines)
    print(table)
    if args.append:
        load = os.getloadavg()
        section = (
            f"\n## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} encode: {n} stimuli x {t} targets x {p} "
            f"features\n\nCPU: {model}, {os.cpu_count()} logical cores, SIMD: {' '.join(simd) or 'n/a'}; "
            f"torch {torch.__version__}, scikit-learn {sklearn.__version__}; load average at the end "
            f"{load[0]:.1f} (shared machine). Same data, same {args.folds} outer folds (checked), same "
            f"{len(grid)} alphas ({args.alphas}); float32 features; BLAS threads: {args.threads or 'default'}. "
            "sklearn picks alphas by leave-one-out, "
            "layertap (himalaya) by inner 5-fold, so per-target alphas, and r, can differ slightly.\n\n"
            f"{table}\n\n`.venv/bin/python bench/encode.py {' '.join(sys.argv[1:])}`\n"
        )
        with open(HERE / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write(section)
        print("appended to bench/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
