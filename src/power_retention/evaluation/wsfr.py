"""The ``wsfr`` command: weight FLOPs, state FLOPs and their ratio per token (DESIGN.md section 5).

FLOP model (forward pass, per token, a multiply-add counts 2 FLOPs):

* **Weight FLOPs**: ``2 x`` the weights of every matrix a token's activations are multiplied by:
  q, k, v, o projections (``2 h (Hq d + 2 Hk d + Hq d)``), the gate projection of power and
  linear layers (``2 h Hk``), the MLP (``3`` or ``2`` matrices ``h x f``: ``2 * 3 h f`` gated,
  ``2 * 2 h f`` plain), and the LM head once (``2 h V``). Norms, RoPE, activations, biases
  and the embedding lookup (all ``O(h)``) are left out.
* **State FLOPs** (activations times the state or the cache), summed over layers, *averaged over
  the positions of one causal sequence of length t* (what training or prefill at context t
  pays per token). Position ``i`` (1-based) of a softmax layer attends to ``i`` keys:
  ``2 (d + e)`` per key (scores ``q.k`` and the weighted sum of values) per query head, so a layer
  pays ``Hq 2 (d + e) (t + 1) / 2``: ``~2 t d`` per head for ``d = e``, half the ``4 t d`` of
  the last position. A window layer attends to ``min(i, w)`` keys. Power retention (and linear
  attention, ``D = d``) in the chunked form attends inside its chunk of ``c`` tokens (position
  ``i`` sees ``(i - 1) mod c + 1`` keys, the same ``2 (d + e)`` each, the power itself not
  counted) and, once ``t > c``, every token is folded into the state once
  (``phi(k) [v, 1]^T``: ``2 D (e + 1)`` per KV head) and queries it once (``phi(q)^T [S, z]``:
  ``2 D (e + 1)`` per query head), ``D = C(d + p - 1, p)``. This is the long-context steady
  state (the first chunk queries an empty state, the last one need not be folded), giving
  DESIGN's ``~4 D e + 2 c d`` per head for ``Hq = Hk``, ``d = e``. The embedding ``phi``
  (``O(D)`` per token and head) is left out.

The ratio is weight / state: below 1 the state dominates (long-context softmax), far above 1 the
state is too small to use the compute (linear attention). Training costs about 3x the forward
pass (forward + backward), which :func:`train_flops_per_token` uses for ``train --flop-budget``.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, replace

from ..ops import sympow_dim

MIXINGS = ("softmax", "window", "linear", "power")


@dataclass(frozen=True)
class Shape:
    """What the FLOP model needs from a model config (one time mixing per layer)."""

    hidden: int
    intermediate: int
    vocab: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mixing: tuple[str, ...]
    deg: int = 2
    chunk_size: int | None = None
    window: int | None = None
    gated_mlp: bool = True

    @property
    def layers(self) -> int:
        return len(self.mixing)


def shape_of(config) -> Shape:
    """A :class:`Shape` from a PowerRetentionConfig, or any transformers decoder config (taken
    as softmax attention, or windowed when it sets ``sliding_window``)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = config.num_hidden_layers
    if config.model_type == "power_retention":
        mixing = tuple(config.layer_time_mixing)
        gated = config.mlp_type == "gated"
    else:
        window = getattr(config, "sliding_window", None)
        mixing = ("window" if window else "softmax",) * layers
        gated = config.model_type not in ("gpt2", "starcoder2", "gpt_neox")
    return Shape(hidden=config.hidden_size, intermediate=config.intermediate_size,
                 vocab=config.vocab_size, num_heads=heads,
                 num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                 head_dim=head_dim, mixing=mixing, deg=getattr(config, "deg", 2),
                 chunk_size=getattr(config, "chunk_size", None),
                 window=getattr(config, "sliding_window", None), gated_mlp=gated)


def _mean_keys(t: int, span: int | None) -> float:
    """Mean over positions i = 1..t of the keys position i attends to: min(i, span), or all i."""
    if span is None or span >= t:
        return (t + 1) / 2
    return (span * (span + 1) / 2 + (t - span) * span) / t


def _mean_keys_in_chunk(t: int, c: int) -> float:
    """Mean over i = 1..t of ((i - 1) mod c) + 1: the keys of a query's own chunk."""
    full, rest = divmod(t, c)
    return (full * c * (c + 1) / 2 + rest * (rest + 1) / 2) / t


def chunk_of(shape: Shape, t: int) -> int:
    """The chunk size the model runs: the config's, else the op's default for length ``t``."""
    if shape.chunk_size is not None:
        return shape.chunk_size
    from ..ops.chunk import default_chunk_size

    return default_chunk_size(t)


def weight_flops(shape: Shape) -> float:
    """Forward weight FLOPs per token (all layers and the LM head)."""
    h, d, hq, hk = shape.hidden, shape.head_dim, shape.num_heads, shape.num_kv_heads
    total = 2 * h * shape.vocab
    for mixing in shape.mixing:
        total += 2 * h * (2 * hq * d + 2 * hk * d)
        if mixing in ("power", "linear"):
            total += 2 * h * hk
        total += 2 * (3 if shape.gated_mlp else 2) * h * shape.intermediate
    return float(total)


def layer_state_flops(shape: Shape, mixing: str, t: int) -> float:
    """Forward state FLOPs per token of one layer, averaged over a causal sequence of ``t``."""
    d = e = shape.head_dim
    hq, hk = shape.num_heads, shape.num_kv_heads
    per_key = 2 * (d + e)
    if mixing == "softmax":
        return hq * per_key * _mean_keys(t, None)
    if mixing == "window":
        return hq * per_key * _mean_keys(t, shape.window)
    if mixing in ("power", "linear"):
        c = chunk_of(shape, t)
        D = sympow_dim(d, shape.deg) if mixing == "power" else d
        state = (hk + hq) * 2 * D * (e + 1) if t > c else 0
        return hq * per_key * _mean_keys_in_chunk(t, c) + state
    raise ValueError(f"unknown time mixing {mixing!r}; expected one of {MIXINGS}")


def state_flops(shape: Shape, t: int) -> float:
    return float(sum(layer_state_flops(shape, m, t) for m in shape.mixing))


def wsfr(shape: Shape, t: int) -> float:
    """Weight-state FLOP ratio at context ``t``."""
    return weight_flops(shape) / state_flops(shape, t)


def train_flops_per_token(config, t: int) -> float:
    """Training FLOPs per token at context ``t``: 3x the forward (weights + state)."""
    shape = shape_of(config)
    return 3 * (weight_flops(shape) + state_flops(shape, t))


def suggest(shape: Shape, t: int, degrees=(2, 4, 6), head_dims=(8, 16, 32, 64, 128, 256),
            chunks=(64, 128, 256, 512, 1024, 2048), top: int = 5) -> list[dict]:
    """Power retention settings nearest balance (ratio 1) at context ``t``.

    Keeps the model's width (``heads x head_dim``, so weight FLOPs barely move: only the gate
    projection changes) and its GQA ratio; varies the degree, the head size and the chunk size
    (chunks longer than ``t`` are not tried). Sorted by ``|log ratio|``.
    """
    width = shape.num_heads * shape.head_dim
    group = shape.num_heads // shape.num_kv_heads
    found = []
    for deg in degrees:
        for head_dim in head_dims:
            if width % head_dim or (width // head_dim) % group:
                continue
            heads = width // head_dim
            for c in chunks:
                if c >= t:
                    continue
                s = replace(shape, mixing=("power",) * shape.layers, deg=deg, head_dim=head_dim,
                            num_heads=heads, num_kv_heads=heads // group, chunk_size=c)
                ratio = wsfr(s, t)
                found.append({"deg": deg, "head_dim": head_dim, "heads": heads, "chunk_size": c,
                              "state_dim": sympow_dim(head_dim, deg), "ratio": ratio,
                              "weight_flops": weight_flops(s), "state_flops": state_flops(s, t)})
    found.sort(key=lambda r: (abs(math.log(r["ratio"])), r["deg"], r["chunk_size"]))
    return found[:top]


def table(rows: list[dict]) -> str:
    """Rows of a report as a fixed-width text table."""
    cols = list(rows[0])
    cells = [[_fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def report(shapes: dict[str, Shape], contexts: list[int]) -> list[dict]:
    """One row per model and context: weight and state MFLOPs per token, and the ratio."""
    rows = []
    for name, shape in shapes.items():
        w = weight_flops(shape)
        for t in contexts:
            s = state_flops(shape, t)
            rows.append({"model": name, "context": t, "weight_MFLOPs": w / 1e6,
                         "state_MFLOPs": s / 1e6, "ratio": w / s})
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..training.presets import SIZES, TIME_MIXING

    parser.add_argument("--presets", nargs="+", default=list(TIME_MIXING),
                        choices=list(TIME_MIXING), help="training presets to report")
    parser.add_argument("--size", default="base", choices=list(SIZES), help="preset backbone")
    parser.add_argument("--config", nargs="+", default=[],
                        help="transformers configs (folders or config.json) to report as well")
    parser.add_argument("--context", nargs="+", type=int,
                        default=[1024, 8192, 65536, 1 << 20], help="context lengths t")
    parser.add_argument("--suggest-context", type=int, default=None,
                        help="context to balance in the suggestion; None: the largest")
    parser.add_argument("--suggest-from", default="power",
                        help="the preset or --config whose width the suggestion keeps")


def run(args: argparse.Namespace) -> int:
    from ..training.presets import preset_config, read_config

    shapes = {name: shape_of(preset_config(name, args.size)) for name in args.presets}
    for path in args.config:
        shapes[str(path)] = shape_of(read_config(path))
    print("Per-token forward FLOPs (mean over a causal sequence of the context length); "
          "ratio = weight / state")
    print(table(report(shapes, args.context)))
    t = args.suggest_context or max(args.context)
    base = shapes.get(args.suggest_from) or shape_of(preset_config("power", args.size))
    print(f"\nPower retention nearest balance at context {t:,} (width "
          f"{base.num_heads * base.head_dim} kept):")
    rows = suggest(base, t)
    print(table([{k: r[k] for k in ("deg", "head_dim", "heads", "chunk_size", "state_dim",
                                    "ratio")} for r in rows]))
    return 0
