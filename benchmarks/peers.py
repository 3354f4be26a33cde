"""Training-step throughput of the PyTorch package `nested-learning` 0.2.0 (a public HOPE reproduction,
github.com/kmccleary3301/nested_learning) on the CPU, for benchmarks/train_step.py to print next to nl_jax.

    <peers_python> -m benchmarks.peers --kind=hope_selfmod --d_model=128 --num_layers=2 --batch=4 \
        --seq_len=256 --vocab=260 --steps=10

Set-up, once, in a virtualenv of its own (torch never enters nl_jax's):

    python3 -m venv ~/peers_venv
    ~/peers_venv/bin/pip install torch==2.13.0 numpy omegaconf   # CPU wheel: add
    #   --index-url https://download.pytorch.org/whl/cpu where no local CPU wheel is on pip's find-links
    ~/peers_venv/bin/pip install --no-deps nested-learning==0.2.0

`--no-deps`: the package's other requirements (datasets, hydra-core, sentencepiece, typer, ...) serve its
data pipeline and CLI; its model and training modules import only torch, numpy and omegaconf.

The model and its settings are the package's own configs (configs/pilot.yaml under
configs/hope/pilot_selfmod.yaml or pilot_transformer.yaml) with the shape flags put in; heads = d_model // 32.
One timed step is one step of the package's training loop (training.run_training_loop, the branch its
pilot configs take: train.online_updates, per_layer_teach_signal, no fast state): the batch is cut into
online chunks (train.online_chunk_size 0: the smallest CMS period; the whole sequence without CMS), and
per chunk it runs the differentiable forward, next-token cross-entropy, the per-layer teach signals
(autograd.grad to each block's output), backward, then the no-grad update pass that writes the self-mod
memories and CMS levels into the parameters; after the last chunk, grad clipping at 1.0 and AdamW (lr 3e-4,
as the package's CPU smoke config; the pilot configs use Muon). Eager and float32: the package's training
compiles only when train.compile.enable (off in its configs), and its bf16 autocast is left off on the CPU.
`--loop=plain` times forward, cross-entropy, backward, clipping and AdamW on the whole sequence instead (no
memory writes). Random tokens; the teach scale is the configured one (as after the teach warm-up). The
package's many small ops make two intra-op threads spin when other processes share the cores: `--threads=1`
then gives steadier numbers.

Prints one JSON line; when torch or nested_learning is missing, one line with "error" and exit status 3.
"""

import argparse
import json
import os
import resource
import sys
import time

_START = time.perf_counter()


def process_elapsed():
    """Seconds since this process started (/proc), else since this module was imported."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _START


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", choices=("hope_selfmod", "transformer"), required=True)
    p.add_argument("--d_model", type=int, default=128)
    p.add_argument("--num_layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--vocab", type=int, default=260)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument("--loop", choices=("package", "plain"), default="package")
    p.add_argument("--online_chunk_size", type=int, default=0, help="the package's train.online_chunk_size")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0: torch's default")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be at least 1 and --warmup at least 0")
    return args


def package_config(args):
    from importlib.resources import files

    from omegaconf import OmegaConf

    root = files("nested_learning") / "configs"
    variant = "pilot_selfmod" if args.kind == "hope_selfmod" else "pilot_transformer"
    base = OmegaConf.load(str(root / "pilot.yaml"))
    over = OmegaConf.load(str(root / "hope" / f"{variant}.yaml"))
    base.pop("hydra")
    over.pop("defaults")
    cfg = OmegaConf.merge(base, over)
    cfg.model.update(
        vocab_size=args.vocab, dim=args.d_model, num_layers=args.num_layers, heads=max(1, args.d_model // 32)
    )
    cfg.data.update(batch_size=args.batch, seq_len=args.seq_len)
    cfg.optim = OmegaConf.create({"type": "adamw", "lr": 3.0e-4, "weight_decay": 0.0, "fused": False})
    cfg.train.mixed_precision.enabled = False
    return cfg


def build(cfg):
    import torch
    from nested_learning import training

    model = training.build_model_from_cfg(cfg.model)
    model.train()
    optimizer = training._build_optimizer(model, cfg, device=torch.device("cpu"))
    return model, optimizer


def online_chunk_size(model, args):
    from nested_learning import training

    if args.online_chunk_size > 0:
        return args.online_chunk_size
    return training._infer_online_chunk_size(model) or args.seq_len


def package_step(model, optimizer, tokens, chunk_size, counts):
    """One step of training.run_training_loop's online branch (per-layer teach signals, stop-grad writes)."""
    import torch
    import torch.nn.functional as F
    from nested_learning import training

    optimizer.zero_grad()
    total_loss, total = 0.0, 0
    for chunk, finalize in training._iter_online_token_chunks(tokens, chunk_size=chunk_size):
        targets = chunk.size(1) - 1
        if targets <= 0:
            continue
        logits, _, block_outputs = model.forward_with_block_outputs(chunk)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), chunk[:, 1:].reshape(-1))
        surprise = training._compute_surprise_override(
            model.get_surprise_metric(), logits=logits, tokens=chunk, loss=loss
        )
        teach = training._compute_layer_teach_signals(loss, block_outputs)
        loss.backward()
        with torch.no_grad():
            model(chunk, teach_signals=teach, surprise_value=surprise, finalize_updates=finalize)
        count_updates(model.pop_update_metrics(), counts)
        total_loss += loss.item() * targets
        total += targets
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
    optimizer.step()
    return total_loss / max(total, 1)


def plain_step(model, optimizer, tokens):
    import torch
    import torch.nn.functional as F

    logits = model(tokens)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
    optimizer.step()
    return loss.item()


def count_updates(metrics, counts):
    """Sums, per CMS level over layers, the chunk updates that passed the surprise gate."""
    for key, value in metrics.items():
        if key.endswith(".updates_applied"):
            level = key.split(".")[-2]
            counts[level] = counts.get(level, 0) + int(value)


def describe(cfg, args, chunk_size):
    m = cfg.model
    opt = "AdamW lr 3e-4 (package's CPU smoke config; pilot uses Muon), grad clip 1.0; eager float32"
    if args.loop == "plain":
        loop = "plain loop: forward + CE + backward + AdamW on the whole sequence, no memory writes"
    else:
        chunks = -(-args.seq_len // chunk_size)
        cut = f"{chunks} online chunks of {chunk_size} token(s) (+1 overlap token), each"
        if chunks == 1:
            cut = "the whole sequence as 1 chunk:"
        loop = (
            f"package loop (train.online_updates, per_layer_teach_signal, online_chunk_size "
            f"{args.online_chunk_size or 'inferred'}): {cut} forward + CE + teach-signal grads + "
            "backward + no-grad update pass"
        )
        if args.kind == "transformer":
            loop += " (a second forward: transformer blocks ignore the teach signal)"
    if args.kind == "transformer":
        model = (
            f"HOPEModel block_variant=transformer (TransformerBlock: SelfAttention {m.heads} heads x "
            f"{m.dim // m.heads}, qk_l2_norm={m.qk_l2_norm}, local_conv_window={m.local_conv_window}, "
            f"no rotary; GELU MLP x{m.get('transformer_mlp_hidden_multiplier', 4)}), tied embeddings"
        )
        return "; ".join((model, loop, opt))
    periods = ",".join(str(level.update_period) for level in m.cms_levels)
    cms_opt = m.optimizers.cms_opt
    model = (
        "HOPEModel block_variant=hope_selfmod (HOPESelfModBlock: SelfModifyingTitans -> CMS; no attention, "
        f"heads unused: one memory of width {m.dim}); self-mod: 6 residual-MLP memories (k,v,q,eta,alpha,"
        f"memory) hidden {m.dim}, chunk {m.self_mod_chunk_size} (k,v,eta,alpha) / "
        f"{m.self_mod_chunk_size_memory} (memory), objective l2, stop-grad vhat, rank-1 precond, fixed "
        f"q, local conv 4, eta_scale {m.self_mod_lr}; CMS {len(m.cms_levels)} levels periods ({periods}), "
        f"GELU MLP x4 with LayerNorm, inner optimizer {cms_opt.type}/{cms_opt.params.variant} lr "
        f"{cms_opt.lr}, signal = per-layer next-token gradient dL/dh_l x teach_scale {m.teach_scale} "
        f"(clip {m.teach_clip}), surprise gate {m.surprise_threshold}; self-mod writes happen only in the "
        "update pass, so within a chunk the read uses the weights at the chunk start; tied embeddings"
    )
    return "; ".join((model, loop, opt))


def main(argv=None):
    args = parse_args(argv)
    try:
        import nested_learning
        import nested_learning.training  # noqa: F401  (fails here, not later, without numpy or omegaconf)
        import torch
    except ImportError as err:
        hint = "pip install torch==2.13.0 numpy omegaconf && pip install --no-deps nested-learning==0.2.0"
        print(json.dumps({"kind": args.kind, "error": f"nested-learning is not installed: {hint} ({err})"}))
        return 3

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = package_config(args)
    model, optimizer = build(cfg)
    chunk_size = online_chunk_size(model, args)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq_len))

    counts = {}
    times = []
    first_step_s = None
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        if args.loop == "plain":
            plain_step(model, optimizer, tokens)
        else:
            package_step(model, optimizer, tokens, chunk_size, counts if step >= args.warmup else {})
        elapsed = time.perf_counter() - start
        if first_step_s is None:
            first_step_s = process_elapsed()
        if step >= args.warmup:
            times.append(elapsed)

    step_s = sum(times) / len(times)  # the timed steps' mean, as benchmarks.train_step times nl_jax
    notes = describe(cfg, args, chunk_size)
    if counts:
        per_step = ", ".join(f"{k} {v / args.steps:g}" for k, v in sorted(counts.items()))
        notes += f"; CMS chunk updates per step (all layers): {per_step}"
    elif args.kind == "hope_selfmod" and args.loop == "package":
        notes += "; no CMS update passed the surprise gate"
    result = {
        "kind": args.kind,
        "package": "nested-learning",
        "version": nested_learning.__version__,
        "torch": torch.__version__,
        "params": sum(p.numel() for p in model.parameters()),
        "tokens_per_s": args.batch * args.seq_len / step_s,
        "step_ms": step_s * 1e3,
        "first_step_s": first_step_s,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "threads": torch.get_num_threads(),
        "shape": {
            "d_model": args.d_model,
            "num_layers": args.num_layers,
            "heads": max(1, args.d_model // 32),
            "batch": args.batch,
            "seq_len": args.seq_len,
            "vocab": args.vocab,
            "steps": args.steps,
            "warmup": args.warmup,
        },
        "notes": notes,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
