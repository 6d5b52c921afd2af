"""normjax.linen against flax.linen beyond norms.py's shapes: small inputs,
masks, other axes and group counts, float16, ``jax.vmap`` and ``axis_name``.

benchmarks/norms.py times the issue's large cases. This script times about
thirty smaller and less common configurations a model meets (a training
step's 128x256 activations, a ViT's 8x197x768 tokens, NCHW batch norm, padded
sequences under a mask, group norm with 1 to 32 groups, per-example batch norm
under ``jax.vmap``), each module against Flax's own with default settings and
with ``use_fast_variance=False``, forward and forward+backward (the gradient
of ``sum(y * g)`` with respect to the parameters and x), jit-compiled, and
with the same interleaved timing as norms.py (:func:`norms.time_case`).

Each case runs in a fresh process of its own: on the CPU, whether glibc
reuses or maps afresh an output's memory depends on the process' allocation
history (benchmarks/README.md, "Page faults"), and one case's history would
otherwise become the next one's.

Usage::

    python benchmarks/sweep.py                      # every case, 15 repetitions
    python benchmarks/sweep.py --cases bn_,gn_ --reps 25
    python benchmarks/sweep.py --list
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from norms import Compiled, compile_pair, machine_line, time_case  # noqa: E402

from normjax import linen as njl  # noqa: E402

IMPLS = ("normjax", "flax", "flax-stable")


class SweepCase(NamedTuple):
    module: str  # the class name in flax.linen and normjax.linen
    shape: tuple[int, ...]
    dtype: str
    kwargs: dict[str, Any] = {}
    training: bool = True  # batch norm: batch statistics (True) or running ones
    masked: bool = False  # padded sequences: a (batch, length, 1) mask
    vmap: str | None = None  # None: no vmap; "": jax.vmap; a name: vmap with that axis_name


def _cases() -> dict[str, SweepCase]:
    f32, bf16, f16 = "float32", "bfloat16", "float16"
    nchw = {"axis": 1}
    cases = {
        "ln_128x256_f32": SweepCase("LayerNorm", (128, 256), f32),
        "ln_256x64_f32": SweepCase("LayerNorm", (256, 64), f32),
        "ln_32x128x512_f32": SweepCase("LayerNorm", (32, 128, 512), f32),
        "ln_32x128x512_bf16": SweepCase("LayerNorm", (32, 128, 512), bf16),
        "ln_8x197x768_f32": SweepCase("LayerNorm", (8, 197, 768), f32),
        "ln_8x197x768_f16": SweepCase("LayerNorm", (8, 197, 768), f16),
        "ln_2axes_64x32x256_f32": SweepCase(
            "LayerNorm", (64, 32, 256), f32,
            {"reduction_axes": (-2, -1), "feature_axes": (-2, -1)},
        ),  # fmt: skip
        "ln_mask_16x128x512_f32": SweepCase("LayerNorm", (16, 128, 512), f32, masked=True),
        "ln_mask_16x128x512_f16": SweepCase("LayerNorm", (16, 128, 512), f16, masked=True),
        "rms_128x256_f32": SweepCase("RMSNorm", (128, 256), f32),
        "rms_8x197x768_f32": SweepCase("RMSNorm", (8, 197, 768), f32),
        "rms_8x197x768_f16": SweepCase("RMSNorm", (8, 197, 768), f16),
        "rms_2x2048x1024_f32": SweepCase("RMSNorm", (2, 2048, 1024), f32),
        "bn_train_256x64_f32": SweepCase("BatchNorm", (256, 64), f32),
        "bn_train_128x256_f32": SweepCase("BatchNorm", (128, 256), f32),
        "bn_train_nchw_32x64x16x16_f32": SweepCase("BatchNorm", (32, 64, 16, 16), f32, nchw),
        "bn_train_nchw_32x64x16x16_f16": SweepCase("BatchNorm", (32, 64, 16, 16), f16, nchw),
        "bn_eval_nchw_32x64x16x16_f32": SweepCase(
            "BatchNorm", (32, 64, 16, 16), f32, nchw, training=False
        ),
        "bn_train_mask_32x128x64_f32": SweepCase("BatchNorm", (32, 128, 64), f32, masked=True),
        "bn_train_vmap_8x32x64_f32": SweepCase("BatchNorm", (8, 32, 64), f32, vmap=""),
        "bn_train_vmap_8x256x128_f32": SweepCase("BatchNorm", (8, 256, 128), f32, vmap=""),
        "bn_train_axis_name_8x32x64_f32": SweepCase(
            "BatchNorm", (8, 32, 64), f32, {"axis_name": "b"}, vmap="b"
        ),
        "bn_train_axis_name_8x256x128_f32": SweepCase(
            "BatchNorm", (8, 256, 128), f32, {"axis_name": "b"}, vmap="b"
        ),
        "gn_g1_16x16x16x256_f32": SweepCase("GroupNorm", (16, 16, 16, 256), f32, {"num_groups": 1}),
        "gn_g8_16x16x16x256_f32": SweepCase("GroupNorm", (16, 16, 16, 256), f32, {"num_groups": 8}),
        "gn_g8_16x16x16x256_f16": SweepCase("GroupNorm", (16, 16, 16, 256), f16, {"num_groups": 8}),
        "gn_size64_16x16x16x256_f32": SweepCase(
            "GroupNorm", (16, 16, 16, 256), f32, {"num_groups": None, "group_size": 64}
        ),
        "gn_size16_16x16x16x256_f32": SweepCase(
            "GroupNorm", (16, 16, 16, 256), f32, {"num_groups": None, "group_size": 16}
        ),
        "gn_g32_8x64x128_f32": SweepCase("GroupNorm", (8, 64, 128), f32, {"num_groups": 32}),
        "in_16x16x16x64_f32": SweepCase("InstanceNorm", (16, 16, 16, 64), f32),
        "in_16x16x16x64_f16": SweepCase("InstanceNorm", (16, 16, 16, 64), f16),
    }
    return cases


CASES = _cases()


def _padding_mask(shape: tuple[int, ...]) -> jax.Array:
    """Sequences of lengths spread evenly up to the full length: ``(batch, length, 1)``."""
    batch, length = shape[0], shape[1]
    lengths = (jnp.arange(batch) + 1) * length // batch
    return (jnp.arange(length)[None, :] < lengths[:, None])[..., None]


def _compile(module: nn.Module, case: SweepCase, x: jax.Array, g: jax.Array) -> Compiled:
    """Jit-compiled forward and forward+backward of ``module`` on ``x`` (under
    ``jax.vmap`` over x's first axis where the case says so)."""
    mask = _padding_mask(x.shape) if case.masked else None
    batch_norm = case.module == "BatchNorm"
    mutable = ["batch_stats"] if batch_norm and case.training else False
    call = {} if not batch_norm else {"use_running_average": not case.training}

    def apply(params: Any, state: Any, x: jax.Array) -> Any:
        kw = dict(call) if mask is None else {**call, "mask": mask}
        return module.apply({"params": params, **state}, x, mutable=mutable, **kw)

    def init(x: jax.Array) -> Any:
        kw = dict(call) if mask is None else {**call, "mask": mask}
        return module.init(jax.random.key(0), x, **kw)

    if case.vmap is not None:
        name = case.vmap or None
        variables = jax.tree.map(lambda v: v[0], jax.vmap(init, axis_name=name)(x))
        apply = jax.vmap(apply, in_axes=(None, None, 0), axis_name=name)
    else:
        variables = init(x)
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    return compile_pair(apply, params, state, x, g, returns_state=bool(mutable))


def time_one(label: str, reps: int) -> dict[str, Any]:
    """Median ms of every implementation and mode of one case (this process)."""
    case = CASES[label]
    kx, kg = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, case.shape, jnp.float32).astype(case.dtype)
    g = jax.random.normal(kg, case.shape, jnp.float32).astype(case.dtype)  # as norms.py's
    impls = {}
    for name, lib, extra in (
        ("normjax", njl, {}), ("flax", nn, {}), ("flax-stable", nn, {"use_fast_variance": False}),
    ):  # fmt: skip
        module = getattr(lib, case.module)(dtype=case.dtype, **case.kwargs, **extra)
        impls[name] = _compile(module, case, x, g)
    copy = jax.jit(lambda x: 2 * x + 1)
    times, faults = time_case(impls, lambda: copy(x), reps, seed=sum(map(ord, label)))
    return {
        "case": label,
        "ms": {f"{k[0]} {k[1]}": v for k, v in times.items()},
        "faults": {f"{k[0]} {k[1]}": v for k, v in faults.items()},
    }


def report(rows: list[dict[str, Any]], reps: int) -> str:
    head = (
        "| case | normjax fwd | flax fwd | flax-stable fwd | normjax f+b | flax f+b "
        "| flax-stable f+b | nj/flax fwd | nj/flax f+b | nj/stable f+b "
        "| faults/call nj / flax: fwd; f+b |"
    )
    lines = [
        machine_line(),
        "",
        f"Median ms of {reps} interleaved repetitions; each case in a process of its own; "
        "f+b = forward+backward. Ratios < 1: normjax faster.",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    ratios: dict[str, list[float]] = {"fwd": [], "fwd+bwd": []}
    for row in rows:
        ms, faults = row["ms"], row["faults"]
        cells = [row["case"]]
        cells += [f"{ms[f'{n} {m}']:.3f}" for m in ("fwd", "fwd+bwd") for n in IMPLS]
        for m in ("fwd", "fwd+bwd"):
            ratios[m].append(ms[f"normjax {m}"] / ms[f"flax {m}"])
            cells.append(f"{ratios[m][-1]:.2f}")
        cells.append(f"{ms['normjax fwd+bwd'] / ms['flax-stable fwd+bwd']:.2f}")
        per_mode = []
        for m in ("fwd", "fwd+bwd"):
            counts = [faults.get(f"{n} {m}", float("nan")) for n in ("normjax", "flax")]
            per_mode.append(" / ".join(f"{c:.0f}" for c in counts))
        cells.append("; ".join(per_mode))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for m, values in ratios.items():
        if values:
            worst = max(range(len(values)), key=values.__getitem__)
            lines.append(
                f"- normjax/flax {m}: median {statistics.median(values):.2f}, worst "
                f"{values[worst]:.2f} ({rows[worst]['case']})"
            )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=15, help="interleaved repetitions (default 15)")
    p.add_argument("--cases", default=None, help="comma-separated substrings of case names")
    p.add_argument("--list", action="store_true", help="print the case names and exit")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process' case
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print("\n".join(CASES))
        return 0
    if args.one is not None:
        print(json.dumps(time_one(args.one, args.reps)))
        return 0
    wanted = None if args.cases is None else [s for s in args.cases.split(",") if s]
    labels = [c for c in CASES if wanted is None or any(w in c for w in wanted)]
    if not labels:
        raise SystemExit(f"no case matches --cases {args.cases!r}; see --list")
    rows = []
    for i, label in enumerate(labels, 1):
        out = subprocess.run(
            [sys.executable, __file__, "--one", label, "--reps", str(args.reps)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        row = json.loads(out.stdout.strip().splitlines()[-1])
        ms = row["ms"]
        print(
            f"[{i}/{len(labels)}] {label}: normjax/flax fwd "
            f"{ms['normjax fwd'] / ms['flax fwd']:.2f}, fwd+bwd "
            f"{ms['normjax fwd+bwd'] / ms['flax fwd+bwd']:.2f}",
            file=sys.stderr,
        )
        rows.append(row)
    text = report(rows, args.reps)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
