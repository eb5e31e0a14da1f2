"""Exact CPU inference engines for the tapped graph: ONNX Runtime and OpenVINO.

On CPUs the float32 forward pass is most of an extraction's cost, and PyTorch eager is not the
fastest exact float32 engine. The tapped part of the model (:func:`layertap.extraction.graph.tap_graph`:
every tapped output a graph output, everything after the deepest one cut off) is exported once to
ONNX with a dynamic batch axis (``torch.onnx.export``, the ``torch.export``-based exporter) and run
by an engine in float32 (OpenVINO with its ``f32`` precision hint: on CPUs with AVX-512-BF16 or AMX
it would otherwise compute in bfloat16). The engines' outputs equal the eager model's to float32
rounding (max relative error below 1e-5 per layer, tested); reducers and ``flatten`` then run in
torch on those outputs, exactly as for the other taps.

The exported model is cached on disk (:func:`cache_dir`), keyed by what it computes: the sha256 of
the graph's code and of every weight it reads, the input shape without the batch axis, and the
torch/onnx/onnxscript versions. One ``.onnx`` file serves both engines. Files are written atomically
(temporary file + rename, then a sidecar holding the file's sha256), so concurrent Slurm shards on a
shared file system never read a half-written model; an entry whose bytes do not match its sidecar
is rebuilt, never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from layertap.errors import LayertapError, MissingDependencyError, option_name, option_spelling
from layertap.extraction.layers import output_tensor, unwrap_output

log = logging.getLogger("layertap")

#: the engines, by backend name -> the distribution that provides it
ENGINES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}
#: every value of ``backend``
BACKENDS = ("auto", "torch", *ENGINES)
#: the engine ``backend="auto"`` prefers on a CPU, first installed wins (by measurement, see bench/RESULTS.md)
AUTO_ORDER = ("openvino", "onnxruntime")
#: ``backend="auto"`` uses an engine only for jobs of at least this many images: the one-off export
#: (5-30 s on 2 cores) must be paid back by the faster forward. Decided from the job, not from the
#: cache's state, so that a resume and every shard of a job choose the same backend.
AUTO_MIN_IMAGES = 256
#: the ONNX opset the graph is exported at
OPSET = 18
#: what ``torch.onnx.export`` needs besides torch
_EXPORT_DISTS = ("onnx", "onnxscript")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def engine_version(engine: str) -> str | None:
    """The installed version of ``engine`` ("onnxruntime" or "openvino"); None when not installed.

    Example:
        >>> engine_version("torch") is None  # not an engine
        True
    """
    dist = ENGINES.get(engine)
    return _version(dist) if dist else None


def engine_available(engine: str) -> bool:
    """Whether ``engine`` and what the export needs (onnx, onnxscript) are installed.

    Args:
        engine: "onnxruntime" or "openvino".

    Returns:
        True when all of them can be imported.

    Example:
        >>> engine_available("tensorrt")
        False
    """
    return engine_version(engine) is not None and all(_version(d) for d in _EXPORT_DISTS)


def check_backend(backend: str) -> None:
    """Refuse a ``backend`` that is not one of :data:`BACKENDS`.

    Args:
        backend: the name asked for.

    Raises:
        LayertapError: naming the choices.

    Example:
        >>> check_backend("openvino")
    """
    if backend not in BACKENDS:
        raise LayertapError(f"{option_name('backend')} must be one of {', '.join(BACKENDS)}, not '{backend}'")


def resolve_backend(
    backend: str, device_type: str, n_images: int, *, compile: bool = False, autocast: str | None = None
) -> str:
    """The backend a job runs with: ``backend`` itself, or what ``"auto"`` picks.

    ``auto`` picks the first installed engine of :data:`AUTO_ORDER` on a CPU, for jobs of at least
    :data:`AUTO_MIN_IMAGES` images without ``compile`` or ``autocast``; torch otherwise (CUDA and
    MPS always run torch). The choice depends only on the job, so a resume and every shard agree.

    Args:
        backend: one of :data:`BACKENDS`.
        device_type: "cpu", "cuda" or "mps".
        n_images: the number of images of the whole job (all shards).
        compile: ``torch.compile`` was asked for (a torch backend).
        autocast: a reduced-precision torch autocast was asked for (a torch backend).

    Returns:
        "torch", "onnxruntime" or "openvino".

    Raises:
        LayertapError: an unknown backend, or an engine together with ``compile``/``autocast``.
        MissingDependencyError: the engine asked for is not installed.

    Example:
        >>> resolve_backend("auto", "cuda", 10_000)
        'torch'
    """
    check_backend(backend)
    if backend == "auto":
        if device_type != "cpu" or compile or autocast or n_images < AUTO_MIN_IMAGES:
            return "torch"
        return next((e for e in AUTO_ORDER if engine_available(e)), "torch")
    if backend in ENGINES:
        if compile or autocast:
            what = option_name("compile" if compile else "autocast")
            raise LayertapError(f"{option_spelling('backend', backend)} runs the float32 graph itself: leave out {what}")
        if not engine_available(backend):
            raise MissingDependencyError(
                f"{option_spelling('backend', backend)} needs the optional packages '{ENGINES[backend]}', 'onnx' and 'onnxscript': "
                "pip install 'layertap[cpu]'"
            )
    return backend


def describe_backend(backend: str) -> dict[str, Any]:
    """The manifest's record of a backend: its name and the versions that computed the numbers.

    Args:
        backend: "torch", "onnxruntime" or "openvino".

    Returns:
        ``{"name", "torch"}``, plus for an engine ``"version"``, ``"exporter"`` (onnx, onnxscript) and ``"opset"``.

    Example:
        >>> describe_backend("torch")["name"]
        'torch'
    """
    record: dict[str, Any] = {"name": backend, "torch": torch.__version__}
    if backend in ENGINES:
        record["version"] = engine_version(backend)
        record["exporter"] = {d: _version(d) for d in _EXPORT_DISTS}
        record["opset"] = OPSET
    return record


# --- the on-disk cache of exported graphs -------------------------------------------------------


def cache_dir() -> Path:
    """Where exported graphs are kept: ``$LAYERTAP_ENGINE_CACHE``, else ``$XDG_CACHE_HOME/layertap/engines``
    (``~/.cache/layertap/engines``). Point it at a shared file system so that Slurm shards share one export.

    Returns:
        The folder (not created here).

    Example:
        >>> cache_dir().name in ("engines", os.environ.get("LAYERTAP_ENGINE_CACHE", "engines").rsplit("/", 1)[-1])
        True
    """
    env = os.environ.get("LAYERTAP_ENGINE_CACHE")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "layertap" / "engines"


def cache_key(graph: nn.Module, input_shape: Sequence[int]) -> str:
    """The key of a graph's export: its code, every weight it reads, the input shape (without the
    batch axis) and the exporter's versions. Reducers are not part of it: they run in torch afterwards.

    Args:
        graph: a ``torch.fx.GraphModule`` or a :class:`HookedForward` (anything with ``code`` and weights).
        input_shape: one input's shape, without the batch axis.

    Returns:
        32 hex digits.

    Example:
        >>> g = torch.fx.symbolic_trace(nn.Linear(2, 3))
        >>> len(cache_key(g, (2,)))
        32
    """
    parts = {
        "code": graph.code,  # a GraphModule's Python code, or HookedForward's description
        "module": repr(graph),  # the layers' settings (eps, strides, ...) a hooked forward's code does not show
        "config": _config_json(graph),
        "weights": _state_fingerprint(graph),
        "input": [int(s) for s in input_shape],
        "opset": OPSET,
        "versions": {d: _version(d) for d in ("torch", *_EXPORT_DISTS)},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _state_fingerprint(graph: nn.Module) -> str:
    """sha256 over every tensor the graph computes with: parameters, all buffers (non-persistent ones too, which
    ``state_dict`` leaves out) and the tensor constants torch.fx keeps as plain attributes."""
    tensors: dict[str, torch.Tensor] = dict(graph.named_parameters(remove_duplicate=False))
    tensors.update(graph.named_buffers(remove_duplicate=False))
    for prefix, mod in graph.named_modules(remove_duplicate=False):
        for attr, value in vars(mod).items():
            if isinstance(value, torch.Tensor):
                tensors.setdefault(f"{prefix}.{attr}" if prefix else attr, value)
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{t.numel()};".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def _config_json(graph: nn.Module) -> str | None:
    """A wrapped model's own configuration (e.g. a transformers ``config``), which its forward reads at run time."""
    for mod in graph.modules():
        config = getattr(mod, "config", None)
        if config is not None and hasattr(config, "to_json_string"):
            return str(config.to_json_string())
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_umask() -> int:
    umask = os.umask(0)  # the only way to read it; done once, at import, not while other threads create files
    os.umask(umask)
    return umask


_UMASK = _read_umask()


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` then rename onto ``path``: readers see the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide the file from other users of a shared cache
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_entry(key: str, directory: Path | None = None) -> Path | None:
    """The cached ``.onnx`` for ``key`` when it is whole (its sha256 matches the sidecar's), else None.

    Args:
        key: see :func:`cache_key`.
        directory: the cache folder (default :func:`cache_dir`).

    Returns:
        The file's path, or None (missing, truncated, altered, or no readable sidecar).

    Example:
        >>> cached_entry("0" * 32, Path("/nonexistent")) is None
        True
    """
    directory = directory or cache_dir()
    model, sidecar = directory / f"{key}.onnx", directory / f"{key}.json"
    try:
        record = json.loads(sidecar.read_text())
        if model.stat().st_size == record["bytes"] and _sha256(model) == record["sha256"]:
            return model
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


class HookedForward(nn.Module):
    """The model's own forward, returning the tapped modules' outputs (collected by forward hooks).

    For models ``torch.fx`` cannot trace (Hugging Face models, Python-level branching on shapes):
    ``torch.export`` (non-strict, which the ONNX exporter uses) runs Python and therefore the hooks,
    so the exported graph returns exactly what the hooks saw. Each output is cloned, so a later
    in-place op cannot change it; whatever no output needs is pruned from the exported graph.

    Args:
        module: the model.
        targets: tapped module paths ("" for the model's output).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
        >>> [t.shape for t in HookedForward(net, ["0", ""])(torch.zeros(2, 4))]  # net[0]'s output, net's output
        [torch.Size([2, 3]), torch.Size([2, 3])]
    """

    def __init__(self, module: nn.Module, targets: list[str]) -> None:
        super().__init__()
        self.module = module
        self.targets = targets
        #: per output, (position in targets, call index); set by each forward
        self.keys: list[tuple[int, int]] = []
        self.train(False)

    @property
    def code(self) -> str:
        """What this computes, for the cache key (the weights are keyed separately)."""
        return f"HookedForward({type(self.module).__module__}.{type(self.module).__qualname__}, {self.targets})"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        got: list[list[torch.Tensor]] = [[] for _ in self.targets]
        mods = dict(self.module.named_modules())

        def keep(i: int, out: Any) -> None:
            got[i].append(output_tensor(out, self.targets[i]).clone())

        handles = [
            mods[t].register_forward_hook(lambda _m, _a, out, i=i: keep(i, out)) for i, t in enumerate(self.targets) if t
        ]
        try:
            result = self.module(x)
        finally:
            for h in handles:
                h.remove()
        for i, t in enumerate(self.targets):
            if not t:
                out = unwrap_output(result)
                if out is None:
                    raise ValueError("the model's output is not a tensor")
                got[i].append(out)
        self.keys = [(i, k) for i, outs in enumerate(got) for k in range(len(outs))]
        return tuple(t for outs in got for t in outs)


def export_onnx(graph: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Export ``graph`` (input ``x``, a tuple of tensors out) to ONNX at ``path``, batch axis dynamic.

    Args:
        graph: the tapped graph or a :class:`HookedForward`.
        example: an input batch (its first two images are used; the batch size does not matter).
        path: the ``.onnx`` file to write (weights inline).

    Raises:
        RuntimeError: the export failed (an op without an ONNX form, data-dependent control flow);
            the message is the first line of the innermost cause (:func:`export_error`).
    """
    example = example[:2].detach().to("cpu", memory_format=torch.contiguous_format)
    if example.shape[0] < 2:  # torch.export specialises a batch of 1: export at 2
        example = torch.cat([example, example])
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    torch_log = logging.getLogger("torch")
    level = torch_log.level
    quiet = io.StringIO()  # the exporter prints its steps, and its graph on failure
    try:
        torch_log.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph,
                (example,),
                str(path),
                dynamo=True,
                input_names=["x"],
                dynamic_shapes={"x": {0: batch}},
                opset_version=OPSET,
                external_data=False,
                verbose=False,
                report=False,
            )
    except Exception as err:
        raise RuntimeError(export_error(err)) from err
    finally:
        torch_log.setLevel(level)


def export_error(err: BaseException) -> str:
    """The first line of the innermost cause of an export failure, without terminal colours.

    Args:
        err: what the exporter raised.

    Returns:
        ``"ExceptionType: first line"``.

    Example:
        >>> export_error(RuntimeError("step 1 failed"))
        'RuntimeError: step 1 failed'
    """
    while err.__cause__ is not None:
        err = err.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    return f"{type(err).__name__}: {first}"


def exported_model(graph: nn.Module, example: torch.Tensor, directory: Path | None = None) -> Path:
    """The ONNX file of ``graph`` for inputs shaped like ``example``: from the cache, or exported now
    (and cached). An entry that is missing, truncated or altered is exported again.

    Args:
        graph: the tapped graph or a :class:`HookedForward`.
        example: an input batch.
        directory: the cache folder (default :func:`cache_dir`).

    Raises:
        RuntimeError: the export failed (see :func:`export_onnx`).

    Returns:
        The path of the ``.onnx`` file.
    """
    directory = directory or cache_dir()
    key = cache_key(graph, tuple(example.shape[1:]))
    found = cached_entry(key, directory)
    if found is not None:
        log.info("engine: using the cached export %s", found)
        return found
    directory.mkdir(parents=True, exist_ok=True)
    model = directory / f"{key}.onnx"
    log.info("engine: exporting the tapped graph to ONNX (once; cached in %s)", directory)
    _write_atomic(model, lambda tmp: export_onnx(graph, example, tmp))
    record = {"sha256": _sha256(model), "bytes": model.stat().st_size, "torch": torch.__version__}
    _write_atomic(directory / f"{key}.json", lambda tmp: tmp.write_text(json.dumps(record)))
    return model


# --- running ------------------------------------------------------------------------------------


def engine_threads() -> int:
    """Intra-op threads for an engine: torch's setting (the cores; the engine's idle threads do not spin, so
    the decode workers get the cores whenever the engine waits).

    Returns:
        At least 1.

    Example:
        >>> engine_threads() >= 1
        True
    """
    return max(1, torch.get_num_threads())


def open_session(engine: str, model: Path, threads: int | None = None) -> Callable[[np.ndarray], list[np.ndarray]]:
    """Load ``model`` into ``engine`` for float32 CPU inference.

    Args:
        engine: "onnxruntime" or "openvino".
        model: the ``.onnx`` file.
        threads: intra-op threads (default :func:`engine_threads`).

    Returns:
        A function from an (N, ...) float32 array to the list of output arrays (fresh, owned).

    Raises:
        LayertapError: an unknown engine.

    Example:
        >>> run = open_session("openvino", exported_model(graph, x))  # doctest: +SKIP
        >>> outputs = run(x.numpy())  # doctest: +SKIP
    """
    threads = threads or engine_threads()
    if engine == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # idle pool threads would spin for work and take the cores the decode workers need
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {"x": x})
    if engine == "openvino":
        import openvino as ov

        config = {
            "INFERENCE_PRECISION_HINT": "f32",  # never bf16/f16: the numbers must be the float32 model's
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": False,  # decode workers share the cores
            # no CACHE_DIR: OpenVINO loads its compiled blobs unchecked (a flipped byte gave other numbers,
            # silently); compiling from the sha256-checked .onnx costs 0.3 s (resnet50) to 1.2 s (vit_b_16)
        }
        compiled = ov.Core().compile_model(str(model), "CPU", config)
        outputs = compiled.outputs
        return lambda x: [np.array(r[o]) for r in (compiled(x),) for o in outputs]
    raise LayertapError(f"unknown engine '{engine}'")


class EngineGraph:
    """A graph module run by an engine: exported (or read from the cache) on the first call, when
    the input's shape is known; every later call, of any batch size, runs the same session.

    Args:
        engine: "onnxruntime" or "openvino".
        graph: the tapped graph (:func:`layertap.extraction.graph.tap_graph`) or a :class:`HookedForward`.
        directory: the cache folder (default :func:`cache_dir`).

    Example:
        >>> graph = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 3), nn.ReLU()))
        >>> run = EngineGraph("onnxruntime", graph)  # doctest: +SKIP
        >>> [t.shape for t in run(torch.zeros(5, 4))]  # exports on this first call  # doctest: +SKIP
        [torch.Size([5, 3])]
    """

    def __init__(self, engine: str, graph: nn.Module, directory: Path | None = None) -> None:
        self.engine = engine
        self.graph = graph
        self.directory = directory
        self._run: Callable[[np.ndarray], list[np.ndarray]] | None = None
        self._shape: tuple[int, ...] | None = None
        #: the .onnx file that runs (after the first call)
        self.model_file: Path | None = None

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.device.type != "cpu":
            raise LayertapError(f"the {self.engine} backend runs on the CPU, not on {x.device.type}")
        if x.dtype != torch.float32:
            raise LayertapError(f"the {self.engine} backend runs float32 inputs, not {x.dtype}")
        if self._run is None or tuple(x.shape[1:]) != self._shape:
            self.model_file = exported_model(self.graph, x, self.directory)
            self._run = open_session(self.engine, self.model_file)
            self._shape = tuple(x.shape[1:])
        arr = x.detach().contiguous().numpy()
        return [torch.from_numpy(o) for o in self._run(arr)]
