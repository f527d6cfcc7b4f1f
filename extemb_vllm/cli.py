"""`extemb`: build checkpoints, prepare texts, evaluate, and run the demo."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}")


def _floats(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}")


def _load(args):
    import torch

    from .machine import default_device
    from .model.checkpoint import load_model

    t = time.perf_counter()
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype), device=default_device(args.device))
    print(f"[extemb] loaded {args.model} on {model.device} ({args.dtype}) in {time.perf_counter() - t:.1f}s",
          file=sys.stderr)
    return model, tok


def cmd_build(args):
    import torch

    from .model import ExtEmbConfig
    from .model.checkpoint import build_checkpoint

    ext = ExtEmbConfig().replace(embedder_layers=args.embedder_layers, chunk_size=args.chunk_size,
                                 k_ladder=tuple(args.k_ladder) if args.k_ladder else None,
                                 window=args.window, raw_tail=args.raw_tail, fill_window=args.fill_window,
                                 append_stable=args.append_stable)
    out = build_checkpoint(args.out, source=args.source, ext=ext, embedder_weights=args.embedder_weights,
                           dtype=getattr(torch, args.dtype), force=args.force)
    print(out)


def cmd_data(args):
    from .corpus import prepare

    print(prepare(args.root, args.sources))


def cmd_eval_ppl(args):
    from .eval import ppl

    model, tok = _load(args)
    methods = ppl.parse_methods(args.k, args.mismatched, args.append_stable)
    fill = model.ext.fill_window if args.fill_window is None else args.fill_window
    results = ppl.evaluate_ppl(model, tok, args.text, args.lengths, methods, window=args.window,
                               raw_tail=args.raw_tail, n_spans=args.spans, score_tokens=args.score_tokens,
                               fill_window=fill, key_alpha=args.key_tokens)
    print(ppl.format_table(results))
    meta = dict(model=str(args.model), text=[str(t) for t in args.text], window=args.window or model.ext.window,
                raw_tail=args.raw_tail or model.ext.raw_tail, fill_window=fill, spans=args.spans,
                score_tokens=args.score_tokens, key_alpha=args.key_tokens, dtype=args.dtype, device=str(model.device),
                command=" ".join(sys.argv))
    if args.json:
        ppl.write_json(results, args.json, meta)
        print(f"wrote {args.json}")
    if args.plot:
        layout = f"raw tail >= {meta['raw_tail']}, window filled" if fill else f"raw tail {meta['raw_tail']}"
        ppl.plot(results, args.plot, title=f"{Path(args.model).name}: W={meta['window']}, {layout}")
        print(f"wrote {args.plot}")


def cmd_eval_passkey(args):
    from .eval import passkey
    from .model.config import layout_rule

    model, tok = _load(args)
    cells = passkey.evaluate_passkey(model, tok, args.lengths, args.depths, args.methods.split(","),
                                     trials=args.trials, window=args.window, raw_tail=args.raw_tail, seed=args.seed,
                                     fill_window=args.fill_window)
    print(passkey.format_table(cells))
    meta = dict(model=str(args.model), window=args.window or model.ext.window, trials=args.trials,
                layout=layout_rule(model.ext, fill_window=args.fill_window),
                device=str(model.device), command=" ".join(sys.argv))
    if args.json:
        passkey.write_json(cells, args.json, meta)
        print(f"wrote {args.json}")
    if args.plot:
        passkey.plot(cells, args.plot)
        print(f"wrote {args.plot}")


def cmd_demo(args):
    """Read a long document through the reference model and continue it."""
    from .texts import read_texts

    model, tok = _load(args)
    name, text = read_texts([args.text])[0]
    ids = tok(text).input_ids[: args.tokens]
    plan = model.plan(len(ids), k=args.k, reserve=args.max_new_tokens)
    print(f"document: {name}, {len(ids)} tokens; window {model.ext.window}")
    if plan.k:
        print(f"compressing the oldest {plan.n_compressed} tokens at k={plan.k} into {plan.n_slots} compact "
              f"embeddings; keeping the last {plan.n_raw} tokens raw: the LLM reads {plan.llm_length} positions")
    print("--- last lines of the document ---")
    print(tok.decode(ids[-60:]))
    t = time.perf_counter()
    new, _ = model.generate(ids, args.max_new_tokens, k=args.k)
    dt = time.perf_counter() - t
    print(f"--- continuation ({len(new)} tokens in {dt:.1f}s, pre-fill included) ---")
    print(tok.decode(new, skip_special_tokens=True))


def cmd_train(args):
    from dataclasses import fields

    from .train.config import TrainConfig

    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    if args.ray_workers:  # a Ray cluster's workers (Ray Train); resuming is Ray Train's: the same name again
        from .train.ray_train import train_on_ray

        print(train_on_ray(cfg, args.ray_workers, gpu=args.gpu, cpus_per_worker=args.ray_cpus_per_worker,
                           address=args.ray_address, storage=args.ray_storage, placement=args.ray_placement,
                           max_failures=args.ray_max_failures))
        return
    if args.gpu:
        raise ValueError("--gpu goes with --ray-workers; one process or torchrun: --device cuda (the default "
                         "where there is a GPU)")
    from .train.trainer import train

    print(train(cfg, resume=args.resume))  # one process, or a rank of `torchrun ... extemb train`


def cmd_compare(args):
    from .train import compare

    res = compare.compare_embedders(args.model, args.embedders, args.text, n_samples=args.samples,
                                    sample_len=args.sample_len, chunk_len=args.chunk_len, ks=args.ks, bf16=args.bf16,
                                    cache_dir=args.cache_dir, recall=args.recall,
                                    key_alpha=None if args.key_tokens < 0 else args.key_tokens,
                                    mismatched=args.mismatched)
    print(compare.format_comparison(res))
    if args.json:
        res["meta"]["command"] = " ".join(sys.argv)
        compare.write_json(res, args.json)
        print(f"wrote {args.json}")


def cmd_compare_arms(args):
    import json

    from .train import compare

    rows = compare.arms_table([json.loads(Path(p).read_text()) for p in args.json])
    print(compare.format_arms(rows))
    if args.plot:
        compare.plot_arms(rows, args.plot)
        print(f"wrote {args.plot}")


def cmd_train_curves(args):
    from .train import compare

    curves = [compare.run_curves(r, weights=args.weights) for r in args.runs]
    print(compare.format_runs(curves))
    if args.plot:
        compare.plot_runs(curves, args.plot)
        print(f"wrote {args.plot}")


def cmd_export(args):
    from .train.export import export_embedder

    out = export_embedder(args.run, args.out, note=args.note, ema=args.ema)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) and {out.with_suffix('.json')}")


def cmd_bench_serve(args):
    from .bench import serve
    from .bench.engines import preload_tcmalloc

    preload_tcmalloc(wanted=args.tcmalloc)  # as the README's serving command, unless --no-tcmalloc
    result = serve.run(args.model, contexts=args.contexts, requests=args.requests, gen=args.gen,
                       k=None if args.k == "auto" else int(args.k), raw_tail=args.raw_tail, engines=args.engines,
                       fill_window=args.fill_window, dtype=args.dtype, eager=args.eager,
                       json_path=args.json, plot_path=args.plot)
    print(serve.format_table(result))


def cmd_bench_embedder(args):
    from .bench import embedder

    result = embedder.run(args.model, chunk_sizes=args.chunks, batches=args.batches, dtypes=args.dtypes,
                          max_tokens_per_call=args.max_tokens_per_call, repeats=args.repeats, device=args.device,
                          json_path=args.json, plot_path=args.plot)
    print(embedder.format_table(result))


def cmd_bench_ray(args):
    from .bench import ray_app

    res = ray_app.run(Path(args.model), workers=args.workers, docs=args.docs, doc_tokens=args.doc_tokens,
                      e2e_requests=args.requests, e2e_tokens=args.tokens, gen=args.gen,
                      concurrency=args.concurrency, dtype=args.embedder_dtype,
                      gpus_per_worker=args.gpus_per_worker, outdir=Path(args.out))
    _write_results(res, args.json, args.plot, ray_app.plot)
    print(ray_app.format_table(res))


def cmd_bench_load(args):
    from .bench import load

    res = load.run(Path(args.model), servers=args.servers, clients=args.clients, duration_s=args.duration,
                   max_requests=args.max_requests, long_tokens=args.long_tokens, outdir=Path(args.out),
                   faults=args.faults)
    _write_results(res, args.json, args.plot, load.plot)
    print(load.format_table(res))


def cmd_bench_chat(args):
    from .bench import chat

    res = chat.run(Path(args.model), texts=args.text, doc_chars=args.doc_chars, follow_ups=args.follow_ups,
                   step_chars=args.step_chars, growth_turns=args.growth_turns, max_tokens=args.max_tokens,
                   outdir=Path(args.out), dtype=args.dtype, scenarios=args.scenarios)
    _write_results(res, args.json, args.plot, chat.plot)
    print(chat.format_table(res))


def _write_results(res: dict, json_path, plot_path, plot_fn):
    import json

    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {json_path}", file=sys.stderr)
    if plot_path:
        plot_fn(res, Path(plot_path))
        print(f"wrote {plot_path}", file=sys.stderr)


def _model_args(p):
    p.add_argument("--model", default="extemb-llama2", help="checkpoint directory (default: ./extemb-llama2)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def _fill_window_arg(p, default="the checkpoint's"):
    p.add_argument("--fill-window", action=argparse.BooleanOptionalAction, default=None,
                   help=f"keep as many recent tokens raw as the window holds beside the slots (default: {default})")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="extemb", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("build", help="build a checkpoint directory (default: the embedded SmolLM2 default)")
    p.add_argument("--source", help="local HF Llama directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", default="extemb-llama2")
    p.add_argument("--embedder-weights", help="trained embedder safetensors (default: initialise from the base)")
    p.add_argument("--embedder-layers", type=int)
    p.add_argument("--chunk-size", type=int)
    p.add_argument("--k-ladder", type=_ints)
    p.add_argument("--window", type=int)
    p.add_argument("--raw-tail", type=int, help="fewest recent tokens kept raw")
    _fill_window_arg(p, default="on")
    p.add_argument("--append-stable", action=argparse.BooleanOptionalAction, default=None,
                   help="the server's default layout rule: whole chunks, k by band, so a growing chat keeps its "
                        "prefix (default: on; off: window filling)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the written weights")
    p.add_argument("--force", action="store_true", help="rebuild even if the directory is up to date")
    p.set_defaults(fn=cmd_build)

    p = sub.add_parser("data", help="fetch and split the public-domain texts (offline registries only)")
    p.add_argument("--root", default="data")
    p.add_argument("--sources", nargs="+", default=["shakespeare"])
    p.set_defaults(fn=cmd_data)

    ev = sub.add_parser("eval", help="evaluate a checkpoint").add_subparsers(dest="what", required=True)
    p = ev.add_parser("ppl", help="perplexity by context length (PG19-style)")
    _model_args(p)
    p.add_argument("--text", nargs="+", required=True, help="text files or folders")
    p.add_argument("--lengths", type=_ints, default=[4096, 8192])
    p.add_argument("--k", type=lambda s: s.split(","), default=["8", "16", "32", "auto"])
    p.add_argument("--window", type=int, help="LLM window W (default: the checkpoint's)")
    p.add_argument("--raw-tail", type=int, help="raw tokens per scored block (default: the checkpoint's)")
    _fill_window_arg(p)
    p.add_argument("--spans", type=int, default=8)
    p.add_argument("--score-tokens", type=int, default=1024)
    p.add_argument("--mismatched", action="store_true", help="add the mismatched-context control for each k")
    p.add_argument("--append-stable", action="store_true",
                   help="add each compressed method laid out by the append-stable rule, paired against window filling")
    p.add_argument("--key-tokens", type=float, metavar="ALPHA",
                   help="also every figure on key tokens: those whose log-probability full attention raises by more "
                        "than ALPHA nats over truncation (e.g. 0.5)")
    p.add_argument("--json")
    p.add_argument("--plot")
    p.set_defaults(fn=cmd_eval_ppl)

    p = ev.add_parser("passkey", help="pass-key retrieval by length and depth")
    _model_args(p)
    p.add_argument("--lengths", type=_ints, default=[2048, 4096, 8192, 16384])
    p.add_argument("--depths", type=_floats, default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--methods", default="auto,truncated,full")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--window", type=int)
    p.add_argument("--raw-tail", type=int)
    _fill_window_arg(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    p.add_argument("--plot")
    p.set_defaults(fn=cmd_eval_passkey)

    from .train.config import TrainConfig  # its fields are the defaults (a plain dataclass)

    d = TrainConfig(model="", data=[], out="")
    p = sub.add_parser("train", help="train the embedder (two-stream auto-regression; the LLM stays frozen)")
    p.add_argument("--model", default="extemb-llama2", help="built checkpoint whose embedder is trained")
    p.add_argument("--data", nargs="+", required=True, help="text files or folders")
    p.add_argument("--heldout", nargs="*", default=[],
                   help="held-out texts (default: the deterministic document split of --data)")
    p.add_argument("--out", default="runs/embedder")
    p.add_argument("--init-embedder", help="start from these embedder weights (e.g. the shipped ones)")
    p.add_argument("--sample-len", type=int, default=d.sample_len)
    p.add_argument("--chunk-len", type=int, default=d.chunk_len)
    p.add_argument("--k-ladder", type=_ints, default=d.k_ladder)
    p.add_argument("--steps", type=int, default=d.steps, help="optimiser steps")
    p.add_argument("--cpu-minutes", type=float, default=d.cpu_minutes,
                   help="stop once the steps have used this much CPU time per thread (arms at equal cost; 0: no limit)")
    p.add_argument("--minutes", type=float, default=d.minutes,
                   help="stop once the steps have run this many minutes, wall clock (a lent GPU; 0: no limit)")
    p.add_argument("--accum", type=int, default=d.accum,
                   help="samples per optimiser step on each rank (global batch: accum x ranks)")
    p.add_argument("--lr", type=float, default=d.lr,
                   help="learning rate at a global batch of --lr-batch samples; other global batches scale it by "
                        "the square root of the ratio")
    p.add_argument("--lr-batch", type=int, default=d.lr_batch,
                   help="the global batch --lr is meant for (default 0: --accum, one process's batch)")
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--clip", type=float, default=d.clip)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-samples", type=int, default=d.eval_samples)
    p.add_argument("--eval-ks", type=_ints, default=d.eval_ks)
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--device", default=None)
    p.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=None,
                   help="gradient checkpointing of the embedder's and the frozen LLM's layers (default: on CUDA)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--window-align", type=int, default=d.window_align,
                   help="training windows start at multiples of this (default 0: the chunk length; 1: anywhere)")
    p.add_argument("--cache-dir", default=d.cache_dir)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on CUDA only; on CPU it pays only with AVX-512-BF16/AMX)")
    p.add_argument("--ema", type=float, default=d.ema,
                   help="keep, evaluate and save a moving average of the weights with this decay (e.g. 0.98)")
    p.add_argument("--distill", type=float, default=d.distill,
                   help="weight w of KL(full-context teacher || slots): loss = (1-w) CE + w KL (0: LM loss only)")
    p.add_argument("--distill-top", type=int, default=d.distill_top,
                   help="the teacher's most likely next tokens kept per position")
    p.add_argument("--recall", type=float, default=d.recall,
                   help="share of samples that are synthetic recall samples (facts planted, asked at the end)")
    p.add_argument("--recall-answer-share", type=float, default=d.recall_answer_share,
                   help="share of a recall sample's loss carried by its answer tokens")
    p.add_argument("--key-weight", type=float, default=d.key_weight,
                   help="weight text tokens by the frozen LLM's long-context gain: 1 + W * gain in nats (0: all alike)")
    p.add_argument("--key-cap", type=float, default=d.key_cap, help="gains are clipped to this many nats")
    p.add_argument("--content-margin", type=float, default=d.content_margin,
                   help="weight of the margin by which the right slots must beat another sample's on key tokens")
    p.add_argument("--margin", type=float, default=d.margin, help="that margin, in nats per token")
    p.add_argument("--raw-rows", type=int, default=d.raw_rows,
                   help="score only the first N tokens of each chunk (slots still from whole chunks; 0: all)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --out (under --ray-workers there is no need: starting "
                        "the same command again resumes from Ray Train's storage)")
    ray_args = p.add_argument_group("on a Ray cluster (Ray Train); under torchrun: `torchrun --nproc-per-node N "
                                    "--no-python extemb train ...` needs none of these")
    ray_args.add_argument("--ray-workers", type=int, default=0,
                          help="train data-parallel on this many Ray Train workers (0: this process)")
    ray_args.add_argument("--gpu", action="store_true", help="one GPU per Ray worker (nccl); else CPUs (gloo)")
    ray_args.add_argument("--ray-cpus-per-worker", type=float, default=1,
                          help="CPUs per worker (and its torch threads)")
    ray_args.add_argument("--ray-address", help="the cluster (default: $RAY_ADDRESS, else a local Ray for this run)")
    ray_args.add_argument("--ray-storage",
                          help="Ray Train's storage for the checkpoints (default: the parent of --out; several "
                               "machines need one they all see: NFS, s3://...); the run's name is --out's last part")
    ray_args.add_argument("--ray-placement", default="PACK", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
                          help="how workers are placed over the nodes (Ray placement group strategy)")
    ray_args.add_argument("--ray-max-failures", type=int, default=3,
                          help="worker failures Ray Train recovers from (from the last checkpoint)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("compare", help="paired held-out loss of embedder weights against the first (ship or not)")
    p.add_argument("--model", default="extemb-llama2", help="built checkpoint (its LLM and tokenizer)")
    p.add_argument("--embedders", nargs="+", required=True, help="embedder safetensors; the first is the baseline")
    p.add_argument("--text", nargs="+", required=True, help="held-out texts (e.g. data/*/heldout)")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--sample-len", type=int, default=4096)
    p.add_argument("--chunk-len", type=int, default=512)
    p.add_argument("--ks", type=_ints, default=[8, 16, 32])
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: where the CPU has native bf16)")
    p.add_argument("--cache-dir", default="data/cache")
    p.add_argument("--recall", action="store_true", help="also the answers of facts planted in the same windows")
    p.add_argument("--key-tokens", type=float, default=0.5, metavar="ALPHA",
                   help="also the loss on key tokens: those the frozen LLM predicts better by more than ALPHA nats "
                        "from the whole window than from their own chunk (negative: off)")
    p.add_argument("--mismatched", action="store_true",
                   help="also each window read through another window's slots: the content control, paired")
    p.add_argument("--json")
    p.set_defaults(fn=cmd_compare)

    p = sub.add_parser("compare-arms", help="arms of a fixed-budget comparison: `extemb compare` results "
                                            "against the CPU-minutes each candidate trained")
    p.add_argument("--json", nargs="+", required=True, help="`extemb compare --json` files (the same baseline)")
    p.add_argument("--plot", help="PNG: per k, paired differences from the baseline against CPU-minutes")
    p.set_defaults(fn=cmd_compare_arms)

    p = sub.add_parser("train-curves", help="held-out loss of training runs against samples and CPU-minutes")
    p.add_argument("--runs", nargs="+", required=True, help="run directories of `extemb train --out`")
    p.add_argument("--weights", choices=["ema", "live"], default="ema", help="the moving average or the live weights")
    p.add_argument("--plot", help="PNG: one column per k, against samples and against CPU-minutes")
    p.set_defaults(fn=cmd_train_curves)

    p = sub.add_parser("export", help="ship a training run's embedder (bf16 safetensors + a JSON record)")
    p.add_argument("--run", required=True, help="the run directory of `extemb train --out`")
    p.add_argument("--out", default=None, help="weights file (default: the package's shipped default embedder)")
    p.add_argument("--note", default="", help="free text for the record (e.g. where earlier steps ran)")
    p.add_argument("--ema", action="store_true", help="ship the run's moving average of the weights (train --ema)")
    p.set_defaults(fn=cmd_export)

    bench = sub.add_parser("bench", help="benchmarks against plain vLLM, in one run").add_subparsers(
        dest="what", required=True)
    p = bench.add_parser("serve", help="long-context workload: plug-in vs plain vLLM full and truncated")
    p.add_argument("--model", default="extemb-llama2")
    p.add_argument("--contexts", type=_ints, default=[2000, 4000, 8000, 16000, 32000, 64000],
                   help="document tokens C (full attention needs C + question + gen <= the base positions)")
    p.add_argument("--requests", type=int, default=4, help="requests per context length (one batch)")
    p.add_argument("--gen", type=int, default=16, help="generated tokens per request")
    p.add_argument("--k", default="16", help="k for the plug-in where it fits (else the smallest that fits), or auto")
    p.add_argument("--raw-tail", type=int, help="the plug-in's raw tail (default: the checkpoint's)")
    _fill_window_arg(p)
    p.add_argument("--engines", nargs="+", default=["plug-in", "full", "truncated"],
                   choices=["plug-in", "full", "truncated"])
    p.add_argument("--dtype", choices=DTYPES, help="every engine's dtype (default: as `vllm serve` of the plug-in "
                   "picks: bfloat16 on a CPU with native bf16, else float32)")
    p.add_argument("--eager", action="store_true", help="eager engines (default: compiled, as `vllm serve` runs)")
    p.add_argument("--tcmalloc", action=argparse.BooleanOptionalAction, default=True,
                   help="preload tcmalloc where installed, as the README's serving command (default)")
    p.add_argument("--json")
    p.add_argument("--plot")
    p.set_defaults(fn=cmd_bench_serve)

    p = bench.add_parser("embedder", help="embedder tokens/s against its FLOP-share limit")
    p.add_argument("--model", default="extemb-llama2")
    p.add_argument("--chunks", type=_ints, default=[512, 1024, 2048, 4096])
    p.add_argument("--batches", type=_ints, default=[1, 4])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--max-tokens-per-call", type=int, default=8192, help="skip batch x chunk above this")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--json")
    p.add_argument("--plot")
    p.set_defaults(fn=cmd_bench_embedder)

    p = bench.add_parser("ray", help="embedder tokens/s by workers; Ray app vs vllm serve end to end")
    p.add_argument("--model", default="extemb-llama2")
    p.add_argument("--workers", type=_ints, default=[1, 2], help="embedder worker counts to measure")
    p.add_argument("--docs", type=int, default=16, help="documents per worker count")
    p.add_argument("--doc-tokens", type=int, default=4096)
    p.add_argument("--embedder-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--requests", type=int, default=8, help="end-to-end requests per server (after warm-up)")
    p.add_argument("--tokens", type=int, default=6000, help="document tokens per end-to-end request")
    p.add_argument("--gen", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--out", default="runs/bench-ray", help="server logs and configs")
    p.add_argument("--json")
    p.add_argument("--plot")
    p.set_defaults(fn=cmd_bench_ray)

    p = bench.add_parser("load", help="concurrent OpenAI clients, bad inputs and faults: vllm serve and the Ray app")
    p.add_argument("--model", default="extemb-llama2")
    p.add_argument("--servers", nargs="+", default=["vllm-serve", "ray-app"], choices=["vllm-serve", "ray-app"])
    p.add_argument("--clients", type=int, default=8, help="concurrent clients")
    p.add_argument("--duration", type=float, default=180, help="seconds of load per server (and per fault phase)")
    p.add_argument("--max-requests", type=int, default=400, help="at most this many requests per phase")
    p.add_argument("--long-tokens", type=int, default=6000, help="tokens of a long prompt (past the window)")
    p.add_argument("--faults", action=argparse.BooleanOptionalAction, default=True,
                   help="after the Ray app's load: the same load with an embedder and the LLM replica killed")
    p.add_argument("--out", default="runs/bench-load", help="server logs and configs")
    p.add_argument("--json")
    p.add_argument("--plot")
    p.set_defaults(fn=cmd_bench_load)

    p = bench.add_parser("chat", help="a growing chat's cache reuse: window-filling vs append-stable layout")
    p.add_argument("--model", default="extemb-llama2")
    p.add_argument("--text", nargs="+", default=["data/fiction/heldout"],
                   help="held-out text files or folders; each rule and scenario reads its own stretch")
    p.add_argument("--doc-chars", type=int, default=60_000, help="follow-ups: characters of the document")
    p.add_argument("--follow-ups", type=int, default=3, help="follow-ups: questions after the first turn")
    p.add_argument("--step-chars", type=int, default=24_000, help="growing: characters appended per turn")
    p.add_argument("--growth-turns", type=int, default=4, help="growing: turns")
    p.add_argument("--scenarios", nargs="+", default=["follow-ups", "growing"], choices=["follow-ups", "growing"])
    p.add_argument("--max-tokens", type=int, default=16, help="generated tokens per turn at most")
    p.add_argument("--dtype", choices=DTYPES, help="the server's dtype (default: as the README's command serves: "
                   "bfloat16 on a CPU with native bf16, else float32)")
    p.add_argument("--out", default="runs/bench-chat", help="the server's log")
    p.add_argument("--json")
    p.add_argument("--plot")
    p.set_defaults(fn=cmd_bench_chat)

    p = sub.add_parser("demo", help="continue a long document through the reference model")
    _model_args(p)
    p.add_argument("--text", default="data/shakespeare/heldout/antony_and_cleopatra.txt")
    p.add_argument("--tokens", type=int, default=12000, help="read this many tokens of the document")
    p.add_argument("--k", type=int, help="fixed k (default: adaptive)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.set_defaults(fn=cmd_demo)
    return ap


def main(argv=None):
    from .model import ContextError

    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ContextError, FileNotFoundError, ValueError) as e:
        print(f"extemb: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
