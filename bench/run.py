"""layertap benchmarks: every contender side by side, same images, model, layers, weights and settings.

    .venv/bin/python bench/run.py                 # full run: 512 JPEGs, every job, appends to bench/RESULTS.md
    .venv/bin/python bench/run.py --quick         # 64 images, to check the harness (bench/.work/RESULTS-quick.md)
    .venv/bin/python bench/run.py --jobs resnet50_layer1 alexnet_3layers --contenders layertap reference

Each contender runs in its own subprocess (its own peak RSS, no shared imports); thingsvision runs
in bench/.venv-thingsvision (bench/setup_thingsvision.sh) and is skipped with a note if that venv is
missing. Every contender's stored output for the first images is compared with layertap's, so the
numbers compare equal work. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
from make_images import make_images, parse_sizes  # noqa: E402

WORK = BENCH / ".work"
TV_PYTHON = BENCH / ".venv-thingsvision" / "bin" / "python"

#: job name -> (torchvision architecture, layers, contenders that run it (None: all))
JOBS: dict[str, tuple[str, list[str], list[str] | None]] = {
    "resnet50_avgpool": ("resnet50", ["avgpool"], None),
    "resnet50_layer1": ("resnet50", ["layer1"], None),
    "alexnet_3layers": ("alexnet", ["features.10", "classifier.4", "classifier.5"], None),
    "alexnet_classifier5": ("alexnet", ["classifier.5"], ["reference", "layertap"]),  # for the 3-vs-1 ratio
    "vit_b_16_block11": ("vit_b_16", ["encoder.layers.encoder_layer_11"], None),
}
CONTENDERS = {
    "ceiling": "ceiling.py",
    "reference": "reference.py",
    "thingsvision": "thingsvision_run.py",
    "torchvision_fx": "torchvision_fx.py",
    "layertap": "layertap_run.py",
    # the same two with torch.compile (spec["compile"]): layertap --compile against a compiled bare forward
    "ceiling_compiled": "ceiling.py",
    "layertap_compiled": "layertap_run.py",
    # one per backend (spec["backend"]); plain "layertap" is the default, backend auto
    "layertap_torch": "layertap_run.py",
    "layertap_onnxruntime": "layertap_run.py",
    "layertap_openvino": "layertap_run.py",
    # the ceiling with layertap's BatchNorm folding, and run by an engine: what the engine alone gains on this CPU
    "ceiling_folded": "ceiling.py",
    "ceiling_openvino": "ceiling_engine.py",
    "ceiling_onnxruntime": "ceiling_engine.py",
}
#: contender -> layertap's backend
BACKEND_OF = {
    "layertap_torch": "torch",
    "layertap_onnxruntime": "onnxruntime",
    "layertap_openvino": "openvino",
    "ceiling_openvino": "openvino",
    "ceiling_onnxruntime": "onnxruntime",
}
#: the columns "vs X": this contender's images/s divided by X's
BASELINES = ("ceiling", "reference", "thingsvision")


def machine_info() -> dict[str, str]:
    import torch
    import torchvision

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    simd = [f for f in sorted(flags) if f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16") or "amx" in f]
    info = {
        "nproc": str(nproc),
        "cpu": cpu,
        "simd": " ".join(simd) or "?",
        "memory": _mem_total(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }
    try:
        import layertap

        info["layertap"] = layertap.__version__
        rev = subprocess.run(
            ["git", "-C", str(BENCH.parent), "describe", "--always", "--dirty"], capture_output=True, text=True
        ).stdout.strip()
        if rev:
            info["layertap"] += f" (git {rev})"
    except ImportError:
        pass
    return info


def _mem_total() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return f"{int(line.split()[1]) / 1024**2:.0f} GiB"
    except OSError:
        pass
    return "?"


def run_contender(name: str, spec: dict[str, Any], log: Path, timeout: float) -> dict[str, Any]:
    """Run one contender in its own process; its result dict (or one with 'failed'/'skipped')."""
    if name == "thingsvision":
        python = Path(os.environ.get("THINGSVISION_PYTHON", TV_PYTHON))
        if not python.exists():
            return {"contender": name, "skipped": f"no {python}: run bash bench/setup_thingsvision.sh"}
    else:
        python = Path(sys.executable)
    out = Path(spec["out"])
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    spec_file = out / "spec.json"
    spec_file.write_text(json.dumps(spec))
    script = str(BENCH / "contenders" / CONTENDERS[name])
    cmd = [sys.executable, "-c", common.LAUNCHER, str(python), script, str(spec_file)]  # see common.py: RSS
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as err:
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"contender": name, "failed": f"timed out after {timeout:.0f} s (log: {log})"}
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(common.RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = log.read_text().strip().splitlines()[-1:] if log.exists() else []
        return {"contender": name, "failed": f"exit {proc.returncode}: {' '.join(tail)[:200]} (log: {log})"}
    result = json.loads(lines[-1][len(common.RESULT_PREFIX) :])
    result["wall_s"] = round(wall, 1)
    return result


def compare(result: dict[str, Any], ref: dict[str, Any] | None, tol: float) -> str:
    """'ok' when every layer's first rows match layertap's to float32 tolerance (relative to max |x|)."""
    import numpy as np

    if "check" not in result:
        return "–"
    if result["contender"] == "layertap":
        return "(reference for checks)"
    if ref is None or "check" not in ref:
        return "not checked (no layertap output)"
    worst, bad = 0.0, []
    for layer, path in result["check"].items():
        a = np.load(path)
        b = np.load(ref["check"][layer])
        if a.size != b.size:
            bad.append(f"{layer}: shape {a.shape} vs {b.shape}")
            continue
        a = a.reshape(b.shape)
        rel = float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))
        worst = max(worst, rel)
        if not rel <= tol:
            bad.append(f"{layer}: rel. error {rel:.1e}")
    if bad:
        return "**MISMATCH** " + "; ".join(bad)
    return f"ok ({worst:.0e})"


def fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def job_table(job: str, arch: str, layers: list[str], results: list[dict[str, Any]], tol: float) -> list[str]:
    by = {r["contender"]: r for r in results}
    ref = by.get("layertap")
    lines = [
        f"### {job}: {arch} [{', '.join(layers)}]",
        "",
        "| contender | img/s | s | peak RSS MB | worker MB | vs ceiling | vs reference | vs thingsvision "
        "| output vs layertap |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        name = r["contender"]
        if r.get("skipped") or r.get("failed"):
            why = r.get("skipped") or r.get("failed")
            lines.append(
                f"| {name} | – | – | – | – | – | – | – | {'skipped' if r.get('skipped') else 'FAILED'}: {why} |"
            )
            continue
        ratios = []
        for base in BASELINES:
            b = by.get(base)
            ok = b and b.get("img_per_s") and not b.get("skipped") and not b.get("failed")
            ratios.append(f"{r['img_per_s'] / b['img_per_s']:.2f}" if ok else "–")
        worker = f"{r['private_workers_mb']:.0f} ({r['rss_workers_mb']:.0f})" if r.get("rss_workers_mb", 0) > 5 else "–"
        lines.append(
            f"| {name} | {fmt(r['img_per_s'], 1)} | {fmt(r['seconds'], 1)} | {r['rss_main_mb']:.0f} | {worker} | "
            f"{' | '.join(ratios)} | "
            f"{compare(r, ref, tol)} |"
        )
    lines.append("")
    return lines


def derived(all_results: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The issue's targets, from layertap's (and, for context, the reference's) numbers."""

    def ips(job: str, who: str) -> float | None:
        for r in all_results.get(job, []):
            if r["contender"] == who and r.get("img_per_s"):
                return r["img_per_s"]
        return None

    lines = ["### Targets", "", "| target | layertap | reference (context) | verdict |", "|---|---:|---:|---|"]
    a, b = ips("resnet50_layer1", "layertap"), ips("resnet50_avgpool", "layertap")
    if a and b:
        r_ref = ips("resnet50_layer1", "reference"), ips("resnet50_avgpool", "reference")
        ctx = fmt(r_ref[0] / r_ref[1]) if all(r_ref) else "–"
        lines.append(
            f"| early layers are cheap: resnet50 layer1 img/s ÷ avgpool img/s ≥ 2 | {a / b:.2f} | {ctx} | "
            f"{'PASS' if a / b >= 2 else 'FAIL'} |"
        )
    a, b = ips("alexnet_3layers", "layertap"), ips("alexnet_classifier5", "layertap")
    if a and b:
        r_ref = ips("alexnet_3layers", "reference"), ips("alexnet_classifier5", "reference")
        ctx = fmt(r_ref[1] / r_ref[0]) if all(r_ref) else "–"
        lines.append(
            f"| 3 layers cost ≤ 1.15× the deepest alone: alexnet time/image, 3 layers ÷ classifier.5 | {b / a:.2f} | "
            f"{ctx} | {'PASS' if b / a <= 1.15 else 'FAIL'} |"
        )
    for job in all_results:
        for who, ceiling in (("layertap", "ceiling"), ("layertap_compiled", "ceiling_compiled")):
            lt_ips, c = ips(job, who), ips(job, ceiling)
            if lt_ips and c:
                lines.append(
                    f"| {job}: {who} img/s ÷ {ceiling} img/s ≥ 0.9 | {lt_ips / c:.2f} | – | "
                    f"{'PASS' if lt_ips / c >= 0.9 else 'FAIL'} |"
                )
        best = max((ips(job, w) or 0 for w in ("layertap", "layertap_compiled")), default=0)
        for base, goal in (("reference", 1.0), ("thingsvision", 1.5)):
            b = ips(job, base)
            if best and b:
                lines.append(
                    f"| {job}: best layertap img/s ÷ {base} img/s ≥ {goal} | {best / b:.2f} | – | "
                    f"{'PASS' if best / b >= goal else 'FAIL'} |"
                )
    for job in all_results:  # issue 14: the CPU engines (backend auto) against torch and thingsvision
        auto = ips(job, "layertap")
        # context: the engine's own gain, bare forward against bare forward (no loader, no hooks, no I/O)
        engine = max((ips(job, c) or 0 for c in ("ceiling_openvino", "ceiling_onnxruntime")), default=0)
        bare = ips(job, "ceiling_folded") or ips(job, "ceiling")
        for base, goal in (("layertap_torch", 1.6), ("thingsvision", 2.5)):
            b = ips(job, base)
            if auto and b:
                ctx = "–"
                if engine and bare and base == "layertap_torch":
                    ctx = f"engine ceiling ÷ torch ceiling {engine / bare:.2f}"
                elif engine and base == "thingsvision":
                    ctx = f"engine ceiling ÷ thingsvision {engine / b:.2f}"
                lines.append(
                    f"| {job}: layertap (auto) img/s ÷ {base} img/s ≥ {goal} | {auto / b:.2f} | {ctx} | "
                    f"{'PASS' if auto / b >= goal else 'FAIL'} |"
                )
    lines.append("")
    return lines if len(lines) > 5 else []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="layertap benchmarks (see bench/README.md)")
    p.add_argument("--quick", action="store_true", help="64 images; results to bench/.work/RESULTS-quick.md")
    p.add_argument("--images", type=int, help="number of JPEGs (default 512; --quick 64)")
    p.add_argument("--sizes", default="500x375,1200x900", help="image sizes WxH, alternating (default %(default)s)")
    p.add_argument("--jobs", nargs="+", choices=list(JOBS), help="jobs to run (default: all)")
    p.add_argument("--contenders", nargs="+", choices=list(CONTENDERS), help="contenders (default: all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, help="DataLoader workers (default: layertap's default, cores - 1)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's default, the cores)")
    p.add_argument("--repeat", type=int, default=1, help="rounds of all contenders; the fastest round counts")
    p.add_argument("--check", type=int, default=4, help="images whose outputs are compared with layertap's")
    p.add_argument("--tol", type=float, default=1e-4, help="max |a-b| / max |layertap| for 'same output'")
    p.add_argument("--results", type=Path, help="markdown file to append to (default bench/RESULTS.md)")
    p.add_argument("--keep-outputs", action="store_true", help="keep the contenders' outputs in bench/.work/out")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per contender run")
    a = p.parse_args(argv)

    import torch

    from layertap.data.images import default_workers

    n = a.images or (64 if a.quick else 512)
    sizes = parse_sizes(a.sizes)
    jobs = a.jobs or list(JOBS)
    contenders = a.contenders or list(CONTENDERS)
    workers = default_workers() if a.workers is None else a.workers
    threads = a.threads or torch.get_num_threads()
    results_file = a.results or (WORK / "RESULTS-quick.md" if a.quick else BENCH / "RESULTS.md")

    t_start = time.perf_counter()
    image_dir = make_images(WORK / f"images-{n}-{a.sizes.replace(',', '+')}", n, sizes)
    images = common.list_images(str(image_dir))
    info = machine_info()
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = [
        f"## {stamp}{' (quick)' if a.quick else ''}",
        "",
        f"machine: {info['nproc']} cores (nproc), {info['cpu']} ({info['simd']}), {info['memory']} RAM; "
        f"python {info['python']}, "
        f"torch {info['torch']}, torchvision {info['torchvision']}, layertap {info.get('layertap', '?')}",
        "",
        f"{len(images)} JPEGs ({', '.join(f'{w}x{h}' for w, h in sizes)} alternating), batch {a.batch_size}, "
        f"{workers} DataLoader worker(s), {threads} torch threads, random weights (seed 0, one file per model), "
        f"warm-up: one batch through the same pipeline before timing (not timed); best of {a.repeat}. "
        "img/s = images ÷ time of the whole pipeline (loader start, decode, forward, write). "
        "vs X = img/s ÷ X's img/s (> 1: faster than X). peak RSS: the contender's main process; worker: the "
        "largest DataLoader worker's peak private memory (its peak RSS, which counts pages shared with the main "
        "process, in parentheses).",
        "",
    ]
    print("\n".join(header), flush=True)

    all_results: dict[str, list[dict[str, Any]]] = {}
    body: list[str] = []
    tv_version = None
    for job in jobs:
        arch, layers, only = JOBS[job]
        weights = common.save_random_weights(arch, WORK / "weights" / f"{arch}-seed0.pt")
        names = [c for c in contenders if only is None or c in only]
        best: dict[str, dict[str, Any]] = {}
        for rnd in range(a.repeat):
            for name in names:
                spec = {
                    "contender": name,
                    "arch": arch,
                    "layers": layers,
                    "weights": weights,
                    "image_dir": str(image_dir),
                    "images": images,
                    "batch_size": a.batch_size,
                    "workers": workers,
                    "threads": threads,
                    "check_n": a.check,
                    "compile": name.endswith("_compiled"),
                    "backend": BACKEND_OF.get(name, "auto"),
                    "out": str(WORK / "out" / job / name),
                }
                r = run_contender(name, spec, WORK / "logs" / f"{job}-{name}-{rnd}.log", a.timeout)
                status = r.get("skipped") or r.get("failed") or f"{r['img_per_s']} img/s"
                rss = f", RSS {r['rss_main_mb']:.0f} MB" if "rss_main_mb" in r else ""
                print(f"[{job}] {name} (round {rnd + 1}): {status}{rss}", flush=True)
                if name == "thingsvision" and r.get("version"):
                    tv_version = r["version"]
                old = best.get(name)
                if old is None or (r.get("img_per_s") or 0) > (old.get("img_per_s") or 0):
                    best[name] = r
        results = [best[nm] for nm in names]
        all_results[job] = results
        table = job_table(job, arch, layers, results, a.tol)
        print("\n".join(table), flush=True)
        body += table
        if not a.keep_outputs:
            shutil.rmtree(WORK / "out" / job, ignore_errors=True)
    body += derived(all_results)
    if tv_version:
        header[2] += f"; thingsvision {tv_version} (bench/.venv-thingsvision, TensorFlow stubbed)"
    footer = [f"total benchmark wall time: {(time.perf_counter() - t_start) / 60:.1f} min", "", ""]
    text = "\n".join(header + body + footer)
    print("\n".join(derived(all_results) + footer))
    results_file.parent.mkdir(parents=True, exist_ok=True)
    if not results_file.exists():
        results_file.write_text("# layertap benchmark results\n\nAppended by `bench/run.py`; see bench/README.md.\n\n")
    with open(results_file, "a") as f:
        f.write(text)
    print(f"appended to {results_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
