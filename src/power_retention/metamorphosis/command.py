"""The ``metamorphose`` command: convert a pretrained transformer folder, then fine-tune it.

    power-retention metamorphose SOURCE --out runs/m                      # convert only
    power-retention metamorphose SOURCE --out runs/m --steps 300 --recipe distill
    torchrun --nproc-per-node 4 -m power_retention.cli metamorphose SOURCE --out runs/m ...

The converted model is written to ``OUT/converted``; fine-tuning writes ``OUT/metrics.jsonl``
and ``OUT/checkpoint-N`` folders (each a transformers model folder) exactly like ``train``, and
``--resume`` continues from the latest one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..training import distributed
from .convert import ROPE_SCALING_TYPES, metamorphose, read_source_config, rope_for_context
from .finetune import FinetuneConfig, config_from_args, finetune
from .recipes import RECIPES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = FinetuneConfig()
    a = parser.add_argument
    a("source", help="a transformers model folder (Llama, Mistral, Qwen2, Qwen3, StarCoder2; "
                     "safetensors weights)")
    a("--out", default=d.out, help="output folder: converted/, metrics.jsonl, checkpoints")
    g = parser.add_argument_group("conversion")
    g.add_argument("--deg", type=int, default=2, help="even degree p of power retention")
    g.add_argument("--chunk-size", type=int, default=None,
                   help="chunk size of the chunked path (speed only); None: the op chooses")
    g.add_argument("--gate-bias-init", type=float, default=7.0,
                   help="initial gate bias: gates start at sigmoid(bias), 0.999 for 7")
    g.add_argument("--rope-theta", type=float, default=None, help="new RoPE base")
    g.add_argument("--rope-scaling", choices=ROPE_SCALING_TYPES, default=None,
                   help="stretch RoPE for a longer target context (needs --rope-factor)")
    g.add_argument("--rope-factor", type=float, default=None,
                   help="target context / source training context")
    g.add_argument("--source-context", type=int, default=None,
                   help="the source's training context (default: its max_position_embeddings)")
    f = parser.add_argument_group("fine-tuning (as the train command)")
    f.add_argument("--steps", type=int, default=0, help="optimizer steps; 0: convert only")
    f.add_argument("--recipe", choices=RECIPES, default=d.recipe,
                   help="next-token loss; distill: KL to the source's logits mixed with it; "
                        "attention-transfer: match each layer's attention first")
    f.add_argument("--distill-weight", type=float, default=d.distill_weight,
                   help="weight w of the KL term: (1 - w) CE + w T^2 KL")
    f.add_argument("--temperature", type=float, default=d.temperature,
                   help="distillation temperature T")
    f.add_argument("--attention-steps", type=int, default=d.attention_steps,
                   help="first-stage steps of attention-transfer")
    f.add_argument("--corpus", nargs="+", default=d.corpus,
                   help="'stdlib', a folder, or text files")
    f.add_argument("--tokenizer", default=None,
                   help="'bytes' or a tokenizer folder (default: the source's own, else bytes)")
    f.add_argument("--validation-fraction", type=float, default=d.validation_fraction)
    f.add_argument("--seq-len", type=int, default=d.seq_len, help="training context length")
    f.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="sequences per process per micro-step")
    f.add_argument("--grad-accum", type=int, default=d.grad_accum)
    f.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    f.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    f.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    f.add_argument("--weight-decay", type=float, default=d.weight_decay)
    f.add_argument("--grad-clip", type=float, default=d.grad_clip)
    f.add_argument("--seed", type=int, default=d.seed)
    f.add_argument("--log-every", type=int, default=d.log_every)
    f.add_argument("--eval-every", type=int, default=d.eval_every)
    f.add_argument("--eval-batches", type=int, default=d.eval_batches)
    f.add_argument("--save-every", type=int, default=d.save_every)
    f.add_argument("--keep", type=int, default=d.keep)
    f.add_argument("--resume", action="store_true",
                   help="keep OUT/converted and continue from the latest checkpoint")
    f.add_argument("--device", default=d.device)
    f.add_argument("--precision", default=d.precision, choices=["auto", "bf16", "fp32"])
    f.add_argument("--strategy", default=d.strategy, choices=["ddp", "fsdp"])
    f.add_argument("--gradient-checkpointing", action="store_true")
    f.add_argument("--no-progress", dest="progress", action="store_false")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    converted = out / "converted"
    ctx = distributed.setup(args.device)
    if ctx.is_main and not (args.resume and (converted / "config.json").is_file()):
        rope = {}
        if args.rope_scaling is not None:
            if args.rope_factor is None:
                raise SystemExit("--rope-scaling needs --rope-factor")
            trained = args.source_context or read_source_config(
                args.source).max_position_embeddings
            rope = rope_for_context(args.rope_scaling, args.rope_factor, trained)
        model = metamorphose(args.source, converted, deg=args.deg, chunk_size=args.chunk_size,
                             gate_bias_init=args.gate_bias_init, rope_theta=args.rope_theta,
                             **rope)
        config = model.config
        print(f"converted {args.source} -> {converted}: {config.num_hidden_layers} layers of "
              f"power retention (p={config.deg}), {sum(p.numel() for p in model.parameters()):,}"
              f" parameters, recurrent state {model.state_bytes():,} bytes per sequence, "
              f"gates starting at sigmoid({config.gate_bias_init:g})")
    distributed.barrier(ctx)
    if args.steps > 0:
        cfg = config_from_args(args)
        cfg.model, cfg.teacher = str(converted), args.source
        finetune(cfg)              # tears the process group down when done
    else:
        distributed.teardown()
    return 0
