"""Speed and memory of normjax's normalization layers against Flax and PyTorch (CPU).

For every case (an op, a shape, a dtype) this measures the median wall time of
the jit-compiled forward pass and of forward+backward (the gradient of
``sum(y * g)`` with respect to the input and the parameters) for:

* ``normjax``: the ``normjax.linen`` module (a thin wrapper over the functional core);
* ``flax``: the ``flax.linen`` module of the same name with its default settings
  (``use_fast_variance=True``: ``E[x^2] - E[x]^2``, which loses the variance of
  data far from zero);
* ``flax-stable``: the same with ``use_fast_variance=False`` (a stable variance,
  the fair comparison);
* ``torch``: ``torch.nn.functional``, when PyTorch is installed (channels-first
  NCHW tensors, PyTorch's native layout), on the CPU, or on CUDA when JAX runs
  on a GPU and PyTorch sees one (``--torch-device``);

and a copy floor (``y = 2x + 1`` on the same array). All implementations get the
same constructor arguments; the output dtype is the input's (``dtype=x.dtype``).
The repetitions of the JAX implementations and the copy floor are interleaved
(one sample of each, at least 20 ms long, in a shuffled round-robin order per
repetition, in one process) so machine noise hits all of them alike; PyTorch's
repetitions follow in a phase of their own (see :func:`time_case`). The
compiled temporary memory of forward+backward comes from
``jax.jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes``, and
the minor page faults per call of the JAX implementations from ``getrusage``
(XLA allocates a program's temporary memory and outputs on every call; a
block that glibc maps afresh page-faults on every page, which on the CPU can
cost more than the computation).

The issue's targets are checked at the end: normjax/Flax <= 1.0 (worst <= 1.05)
forward and forward+backward, geometric mean <= 0.8 on forward+backward,
layer_norm forward+backward temporary memory <= 0.1x the input's size, and
within 2x of PyTorch.

Usage::

    python benchmarks/norms.py                       # every case, float32 and bfloat16
    python benchmarks/norms.py --quick               # 5 repetitions, float32 only
    python benchmarks/norms.py --cases layer_norm,group_norm --dtype float32 --reps 25
    python benchmarks/norms.py --out benchmarks/results_norms.md
    python benchmarks/norms.py --device-time --reps 20   # on a GPU: kernel time
"""

from __future__ import annotations

import argparse
import math
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from normjax import linen as njl

try:  # PyTorch is optional: only a comparison column.
    import torch
    import torch.nn.functional as tf
except ImportError:  # pragma: no cover - depends on the environment
    torch = None

IMPLS = ("normjax", "flax", "flax-stable", "torch")
MODES = ("fwd", "fwd+bwd")
# One timing sample runs the function until at least this long. With 2 ms
# samples a same-process ratio of identical code read 0.53 and 1.35 in two
# blocks of 21 repetitions (layer norm 4096x768 forward); with 20 ms samples
# the same blocks read 0.64 and 0.80 (benchmarks/README.md, "Measurement").
SAMPLE_SECONDS = 20e-3

SHAPES_2D = ((4096, 768), (512, 4096), (65536, 64))
SHAPES_4D = ((64, 32, 32, 64), (32, 32, 32, 128))
# op -> the shapes it runs on: layer/RMS norm on (tokens, features), group and
# instance norm on images (N, H, W, C), batch norm on both.
OP_SHAPES: dict[str, tuple[tuple[int, ...], ...]] = {
    "layer_norm": SHAPES_2D,
    "rms_norm": SHAPES_2D,
    "batch_norm_train": SHAPES_2D + SHAPES_4D,
    "batch_norm_eval": SHAPES_2D + SHAPES_4D,
    "group_norm": SHAPES_4D,
    "instance_norm": SHAPES_4D,
}
TARGET_WORST = 1.05
TARGET_GEOMEAN_FWD_BWD = 0.8
TARGET_LN_TEMP = 0.1
TARGET_TORCH = 2.0


class Case(NamedTuple):
    op: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def label(self) -> str:
        return f"{self.op} {'x'.join(map(str, self.shape))} {self.dtype}"


# ----------------------------------------------------------------------------
# The implementations of one case.


def _flax_module(lib: Any, op: str, dtype: Any, **extra: Any) -> nn.Module:
    """The module for ``op`` from ``lib`` (flax.linen or normjax.linen)."""
    kw = dict(dtype=dtype, **extra)
    if op == "layer_norm":
        return lib.LayerNorm(**kw)
    if op == "rms_norm":
        return lib.RMSNorm(**kw)
    if op == "batch_norm_train":
        return lib.BatchNorm(use_running_average=False, **kw)
    if op == "batch_norm_eval":
        return lib.BatchNorm(use_running_average=True, **kw)
    if op == "group_norm":
        return lib.GroupNorm(num_groups=32, **kw)
    if op == "instance_norm":
        return lib.InstanceNorm(**kw)
    raise ValueError(f"unknown op {op!r}")


class Compiled(NamedTuple):
    fwd: Callable[[], Any]
    fwd_bwd: Callable[[], Any]
    temp_bytes: int | None


def _jax_impl(module: nn.Module, x: jax.Array, g: jax.Array) -> Compiled:
    """Jit-compiled forward and forward+backward of a linen module on ``x``.

    The batch statistics and the cotangent ``g`` are arguments, as in a model:
    closed over, they would be constants that XLA folds into the program (the
    bias gradient ``sum(g)`` computed at compile time).
    """
    variables = module.init(jax.random.key(0), x)
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    mutable = ["batch_stats"] if isinstance(module, (nn.BatchNorm, njl.BatchNorm)) else False
    training = mutable and not module.use_running_average

    def forward(params: Any, state: Any, x: jax.Array) -> Any:
        out = module.apply({"params": params, **state}, x, mutable=mutable if training else False)
        return out  # (y, updated batch_stats) in training batch norm, y otherwise

    return compile_pair(forward, params, state, x, g, returns_state=bool(training))


def compile_pair(
    forward: Callable[[Any, Any, jax.Array], Any],
    params: Any,
    state: Any,
    x: jax.Array,
    g: jax.Array,
    *,
    returns_state: bool,
) -> Compiled:
    """``forward(params, state, x)`` and the gradient of ``sum(y * g)`` with
    respect to the parameters and x, each jit-compiled; ``y`` is the output,
    or its first element where ``forward`` also returns the updated state."""

    def loss(params: Any, state: Any, x: jax.Array, g: jax.Array) -> jax.Array:
        out = forward(params, state, x)
        y = out[0] if returns_state else out
        return jnp.sum(y.astype(jnp.float32) * g)

    fwd = jax.jit(forward).lower(params, state, x).compile()
    fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 2))).lower(params, state, x, g).compile()
    mem = fwd_bwd.memory_analysis()
    temp = None if mem is None else int(mem.temp_size_in_bytes)
    return Compiled(lambda: fwd(params, state, x), lambda: fwd_bwd(params, state, x, g), temp)


def _torch_impl(
    op: str, x_nhwc: np.ndarray, g_nhwc: np.ndarray, dtype: str, device: str
) -> Compiled:
    """PyTorch forward and forward+backward on ``device``; 4-D inputs as NCHW tensors."""
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]

    def to_torch(a: np.ndarray) -> Any:
        t = torch.from_numpy(np.array(a, dtype=np.float32))  # a writable copy
        if t.ndim == 4:
            t = t.permute(0, 3, 1, 2).contiguous()
        return t.to(device=device, dtype=tdtype)

    x, g = to_torch(x_nhwc), to_torch(g_nhwc).float()
    channels = x_nhwc.shape[-1]
    f32 = dict(dtype=torch.float32, device=device)
    weight = torch.ones(channels, **f32)
    bias = torch.zeros(channels, **f32)
    running_mean = torch.zeros(channels, **f32)
    running_var = torch.ones(channels, **f32)

    def call(x: Any, w: Any, b: Any) -> Any:
        if op == "layer_norm":
            return tf.layer_norm(x, (channels,), w, b, eps=1e-6)
        if op == "rms_norm":
            return tf.rms_norm(x, (channels,), w, eps=1e-6)
        if op == "batch_norm_train":
            return tf.batch_norm(x, running_mean, running_var, w, b, True, 0.01, 1e-5)
        if op == "batch_norm_eval":
            return tf.batch_norm(x, running_mean, running_var, w, b, False, 0.01, 1e-5)
        if op == "group_norm":
            return tf.group_norm(x, 32, w, b, eps=1e-6)
        if op == "instance_norm":
            return tf.instance_norm(x, weight=w, bias=b, eps=1e-6)
        raise ValueError(op)

    # Mixed precision (bf16 input, fp32 parameters) where PyTorch supports it.
    try:
        with torch.no_grad():
            call(x, weight, bias)
    except RuntimeError:
        weight, bias = weight.to(tdtype), bias.to(tdtype)

    def fwd() -> Any:
        with torch.no_grad():
            return call(x, weight, bias)

    def fwd_bwd() -> Any:
        xr = x.detach().requires_grad_(True)
        w = weight.detach().requires_grad_(True)
        b = bias.detach().requires_grad_(True)
        y = call(xr, w, b)
        inputs = [xr, w] if op == "rms_norm" else [xr, w, b]
        return torch.autograd.grad((y.float() * g).sum(), inputs)

    return Compiled(fwd, fwd_bwd, None)


def build_case(
    case: Case, torch_device: str = "cpu", with_torch: bool = True
) -> tuple[dict[str, Compiled], Callable[[], Any]]:
    """Every implementation of ``case`` (PyTorch's if installed and ``with_torch``),
    plus the copy floor."""
    dtype = jnp.dtype(case.dtype)
    kx, kg = jax.random.split(jax.random.key(len(case.label)))
    x = jax.random.normal(kx, case.shape, jnp.float32).astype(dtype)
    # The cotangent in the output's dtype, as a model's next layer gives it. A
    # float32 g made the loss itself round g to bfloat16, in a buffer of x's
    # size that both normjax's and Flax's programs held.
    g = jax.random.normal(kg, case.shape, jnp.float32).astype(dtype)
    impls = {
        "normjax": _jax_impl(_flax_module(njl, case.op, dtype), x, g),
        "flax": _jax_impl(_flax_module(nn, case.op, dtype), x, g),
        "flax-stable": _jax_impl(_flax_module(nn, case.op, dtype, use_fast_variance=False), x, g),
    }
    if torch is not None and with_torch:
        xf = np.asarray(x.astype(jnp.float32))
        gf = np.asarray(g.astype(jnp.float32))
        impls["torch"] = _torch_impl(case.op, xf, gf, case.dtype, torch_device)
    copy = jax.jit(lambda x: 2 * x + 1).lower(x).compile()
    return impls, lambda: copy(x)


# ----------------------------------------------------------------------------
# Timing.


def _block(out: Any) -> None:
    """Waits for JAX's asynchronous dispatch and PyTorch's CUDA stream."""
    for leaf in jax.tree.leaves(out):
        if isinstance(leaf, jax.Array):
            leaf.block_until_ready()
        elif torch is not None and isinstance(leaf, torch.Tensor) and leaf.is_cuda:
            torch.cuda.synchronize()


def _calls_per_sample(fn: Callable[[], Any]) -> int:
    """How many back-to-back calls make one sample of at least SAMPLE_SECONDS."""
    _block(fn())  # warm-up (allocations, thread pools)
    start = time.perf_counter()
    _block(fn())
    once = time.perf_counter() - start
    return max(1, math.ceil(SAMPLE_SECONDS / max(once, 1e-7)))


def _minor_faults() -> int | None:
    """This process's minor page faults so far (None where getrusage is missing)."""
    try:
        import resource
    except ImportError:  # not on Linux or macOS
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _sample_ms(fn: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        out = fn()
    _block(out)
    return 1e3 * (time.perf_counter() - start) / calls


def time_case(
    impls: dict[str, Compiled], copy: Callable[[], Any], reps: int, seed: int
) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], float]]:
    """Median ms and median minor page faults per call of every (implementation,
    mode), repetitions interleaved.

    PyTorch is timed in a phase of its own, after the JAX implementations: its
    OpenMP threads keep spinning on both cores for a while after each call, and
    interleaved with them Flax's forward+backward read 8.1 ms against 5.2 ms
    alone while normjax's did not move (layer norm 4096x768), which flattered
    normjax/Flax by a third.
    """
    jax_fns: dict[tuple[str, str], Callable[[], Any]] = {("copy", "fwd"): copy}
    torch_fns: dict[tuple[str, str], Callable[[], Any]] = {}
    for name, impl in impls.items():
        fns = torch_fns if name == "torch" else jax_fns
        fns[(name, "fwd")] = impl.fwd
        fns[(name, "fwd+bwd")] = impl.fwd_bwd
    rng = random.Random(seed)
    times: dict[tuple[str, str], float] = {}
    faults: dict[tuple[str, str], float] = {}
    for fns in (jax_fns, torch_fns):
        calls = {key: _calls_per_sample(fn) for key, fn in fns.items()}
        samples: dict[tuple[str, str], list[float]] = {key: [] for key in fns}
        fault_samples: dict[tuple[str, str], list[float]] = {key: [] for key in fns}
        order = list(fns)
        for _ in range(reps if fns else 0):
            rng.shuffle(order)
            for key in order:
                before = _minor_faults()
                samples[key].append(_sample_ms(fns[key], calls[key]))
                if before is not None:
                    fault_samples[key].append((_minor_faults() - before) / calls[key])
        times.update({key: statistics.median(v) for key, v in samples.items()})
        faults.update({key: statistics.median(v) for key, v in fault_samples.items() if v})
    return times, faults


def device_ms(fns: dict[Any, Callable[[], Any]], calls: int) -> dict[Any, float]:
    """Kernel time per call on the accelerator, in ms: the device events of a
    profiler trace summed over ``calls`` calls of each function, divided by
    ``calls``.

    On a GPU these programs run for 5-150 us, less than JAX takes to dispatch
    them, so wall time measures dispatch and launches more than the kernels
    (on an H100 the copy floor read 30-60 us for kernels of 3-8 us). Each
    function's calls run inside a trace annotation of their own, and a device
    event counts toward the annotation it starts in (every call is waited for
    before the next, so none overlaps another's).
    """
    import gzip
    import json
    import tempfile

    for fn in fns.values():
        _block(fn())
    keys = list(fns)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for i, key in enumerate(keys):
                with jax.profiler.TraceAnnotation(f"normjax-bench-{i}"):
                    for _ in range(calls):
                        _block(fns[key]())
        (trace_file,) = Path(trace_dir).glob("**/*.trace.json.gz")
        events = json.load(gzip.open(trace_file))["traceEvents"]
    device_pids = {
        e["pid"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
        and "/device:" in e["args"]["name"]
    }  # fmt: skip
    if not device_pids:
        raise RuntimeError("--device-time needs an accelerator: the trace has no device events")
    windows = {
        int(e["name"].rsplit("-", 1)[1]): (e["ts"], e["ts"] + e["dur"])
        for e in events
        if e.get("ph") == "X" and e["name"].startswith("normjax-bench-")
    }
    total = dict.fromkeys(range(len(keys)), 0.0)
    for e in events:
        # Host <-> device copies are not the program's (none is expected).
        if e.get("ph") != "X" or e["pid"] not in device_pids or "Memcpy" in e["name"]:
            continue
        for i, (start, end) in windows.items():
            if start <= e["ts"] <= end:
                total[i] += e["dur"]
    return {key: total[i] / calls / 1e3 for i, key in enumerate(keys)}


def device_time_case(
    impls: dict[str, Compiled], copy: Callable[[], Any], calls: int
) -> dict[tuple[str, str], float]:
    """:func:`device_ms` of every JAX (implementation, mode) and the copy floor."""
    fns: dict[tuple[str, str], Callable[[], Any]] = {("copy", "fwd"): copy}
    for name, impl in impls.items():
        if name != "torch":
            fns[(name, "fwd")] = impl.fwd
            fns[(name, "fwd+bwd")] = impl.fwd_bwd
    return device_ms(fns, calls)


# ----------------------------------------------------------------------------
# Report.


def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def run(
    cases: Sequence[Case],
    reps: int,
    log: Callable[[str], None],
    torch_device: str = "cpu",
    device_time: bool = False,
) -> list[dict[str, Any]]:
    rows = []
    for i, case in enumerate(cases):
        impls, copy = build_case(case, torch_device, with_torch=not device_time)
        if device_time:
            times, faults = device_time_case(impls, copy, reps), {}
        else:
            times, faults = time_case(impls, copy, reps, seed=i)
        row: dict[str, Any] = {"case": case, "copy": times[("copy", "fwd")]}
        for name in IMPLS:
            for mode in MODES:
                row[(name, mode)] = times.get((name, mode))
                row[("faults", name, mode)] = faults.get((name, mode))
        for name in ("normjax", "flax", "flax-stable"):
            row[("temp", name)] = impls[name].temp_bytes
        rows.append(row)
        log(
            f"[{i + 1}/{len(cases)}] {case.label}: normjax/flax fwd "
            f"{_fmt(_ratio(row[('normjax', 'fwd')], row[('flax', 'fwd')]))}, fwd+bwd "
            f"{_fmt(_ratio(row[('normjax', 'fwd+bwd')], row[('flax', 'fwd+bwd')]))}"
        )
    return rows


def report(rows: list[dict[str, Any]], reps: int, device_time: bool = False) -> tuple[str, bool]:
    """The markdown table, the summary and the target checks; True if all met."""
    header = (
        "| case | copy | normjax fwd | flax fwd | flax-stable fwd | torch fwd "
        "| normjax f+b | flax f+b | flax-stable f+b | torch f+b "
        "| nj/flax fwd | nj/flax f+b | nj/stable f+b | nj/torch (worst) "
        "| temp MB nj / flax / stable | faults/call nj / flax: fwd; f+b |"
    )
    lines = [header, "|" + "|".join(["---"] * (header.count("|") - 1)) + "|"]
    fwd_r, fb_r, stable_r, torch_r, ln_temp = [], [], [], [], []
    for row in rows:
        case: Case = row["case"]
        r_fwd = _ratio(row[("normjax", "fwd")], row[("flax", "fwd")])
        r_fb = _ratio(row[("normjax", "fwd+bwd")], row[("flax", "fwd+bwd")])
        r_stable = _ratio(row[("normjax", "fwd+bwd")], row[("flax-stable", "fwd+bwd")])
        r_torch = [
            r
            for r in (
                _ratio(row[("normjax", "fwd")], row[("torch", "fwd")]),
                _ratio(row[("normjax", "fwd+bwd")], row[("torch", "fwd+bwd")]),
            )
            if r is not None
        ]
        fwd_r.append(r_fwd)
        fb_r.append(r_fb)
        stable_r.append(r_stable)
        torch_r.extend(r_torch)
        temps = [row[("temp", n)] for n in ("normjax", "flax", "flax-stable")]
        if case.op == "layer_norm" and temps[0] is not None:
            x_bytes = math.prod(case.shape) * jnp.dtype(case.dtype).itemsize
            ln_temp.append((case.label, temps[0] / x_bytes))
        digits = 4 if device_time else 2  # a GPU's kernels take microseconds
        cells = [
            case.label,
            _fmt(row["copy"], digits),
            *(_fmt(row[(n, "fwd")], digits) for n in IMPLS),
            *(_fmt(row[(n, "fwd+bwd")], digits) for n in IMPLS),
            _fmt(r_fwd),
            _fmt(r_fb),
            _fmt(r_stable),
            _fmt(max(r_torch) if r_torch else None),
            " / ".join(_fmt(None if t is None else t / 2**20, 1) for t in temps),
            "; ".join(
                " / ".join(_fmt(row[("faults", n, mode)], 0) for n in ("normjax", "flax"))
                for mode in MODES
            ),
        ]
        lines.append("| " + " | ".join(cells) + " |")

    if device_time:
        how = (
            f"Kernel time per call on the accelerator, ms (the profiler's device events, "
            f"mean of {reps} calls; no PyTorch column)"
        )
    else:
        how = (
            f"Median ms of {reps} repetitions of samples of at least "
            f"{SAMPLE_SECONDS * 1e3:g} ms, the JAX implementations interleaved and PyTorch "
            "in a phase of its own"
        )
    out = [
        f"{how}; jit-compiled; f+b = forward+backward (grad of sum(y*g) w.r.t. x and the "
        "parameters). Ratios < 1: normjax faster.",
        "",
        *lines,
        "",
    ]
    checks = []

    def check(name: str, value: float, limit: float) -> None:
        ok = value <= limit
        checks.append(ok)
        out.append(f"- {name}: {value:.3f} (target <= {limit}) {'PASS' if ok else 'FAIL'}")

    out.append(f"Summary over {len(rows)} cases:")
    check("worst normjax/flax, forward", max(fwd_r), TARGET_WORST)
    check("worst normjax/flax, forward+backward", max(fb_r), TARGET_WORST)
    out.append(f"- geometric mean normjax/flax, forward: {_geomean(fwd_r):.3f}")
    check("geometric mean normjax/flax, forward+backward", _geomean(fb_r), TARGET_GEOMEAN_FWD_BWD)
    out.append(
        f"- normjax/flax-stable forward+backward: worst {max(stable_r):.3f}, "
        f"geometric mean {_geomean(stable_r):.3f}"
    )
    if torch_r:
        check("worst normjax/torch (forward or forward+backward)", max(torch_r), TARGET_TORCH)
        out.append(f"- geometric mean normjax/torch: {_geomean(torch_r):.3f}")
    elif device_time:
        out.append("- device time: no PyTorch comparison")
    else:
        out.append("- PyTorch not installed: no torch comparison")
    if ln_temp:
        label, worst = max(ln_temp, key=lambda t: t[1])
        check(f"layer_norm f+b temp memory / input size (worst: {label})", worst, TARGET_LN_TEMP)
    return "\n".join(out), all(checks)


def select_cases(names: str | None, dtypes: Sequence[str], quick: bool) -> list[Case]:
    wanted = None if not names else [s.strip() for s in names.split(",") if s.strip()]
    cases = []
    for dtype in dtypes:
        for op, shapes in OP_SHAPES.items():
            for shape in shapes[:1] if quick else shapes:
                case = Case(op, shape, dtype)
                if wanted is None or any(w in case.label for w in wanted):
                    cases.append(case)
    unmatched = [w for w in wanted or () if not any(w in c.label for c in cases)]
    if unmatched:
        # Each filter must match: one misspelled among others was dropped silently.
        labels = sorted({Case(op, s, "float32").label.rsplit(" ", 1)[0]
                         for op, shapes in OP_SHAPES.items() for s in shapes})
        raise SystemExit(f"--cases: no case matches {unmatched}; the cases are {labels}")
    return cases


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        if names:
            cpu = f"{names[0]} x{len(names)}"
    except OSError:
        pass
    versions = f"jax {jax.__version__}, flax {getattr(nn, '__version__', None) or _flax_ver()}"
    if torch is not None:
        versions += f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
    backend = jax.default_backend()
    if backend != "cpu":
        backend += f" ({jax.devices()[0].device_kind})"
    return f"Machine: {cpu}; {platform.system()}; {backend}; {versions}."


def _flax_ver() -> str:
    import flax

    return flax.__version__


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=15, help="interleaved repetitions (default 15)")
    p.add_argument(
        "--cases",
        default=None,
        help="comma-separated substrings of case labels, e.g. 'layer_norm,group_norm 32x'",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16", "all"), default="all")
    p.add_argument(
        "--quick", action="store_true", help="5 repetitions, float32, first shape of each op"
    )
    p.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    p.add_argument(
        "--device-time",
        action="store_true",
        help="on an accelerator: kernel time per call from a profiler trace (--reps calls) "
        "instead of wall time, which a GPU's dispatch dominates; no PyTorch column",
    )
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.add_argument(
        "--torch-device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where PyTorch runs; auto: cuda when JAX runs on a GPU and PyTorch sees one",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    reps = 5 if args.quick else args.reps
    dtypes = ["float32"] if args.quick and args.dtype == "all" else (
        ["float32", "bfloat16"] if args.dtype == "all" else [args.dtype]
    )  # fmt: skip
    cases = select_cases(args.cases, dtypes, args.quick)
    if not cases:
        print(f"no case matches --cases={args.cases!r}", file=sys.stderr)
        return 2
    log = lambda s: print(s, file=sys.stderr, flush=True)
    torch_device = args.torch_device
    if torch_device == "auto":
        on_gpu = jax.default_backend() == "gpu" and torch is not None and torch.cuda.is_available()
        torch_device = "cuda" if on_gpu else "cpu"
    rows = run(cases, reps, log, torch_device, args.device_time)
    table, ok = report(rows, reps, args.device_time)
    text = f"{machine_line()}\n\n{table}\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
