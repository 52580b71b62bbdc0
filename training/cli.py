"""`loraplex train | eval | merge`."""

from __future__ import annotations

import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="fine-tune a LoRA/QLoRA adapter from a YAML config",
                              description="Fine-tune a LoRA/QLoRA adapter from a YAML config, tracked in MLflow.")
    p.add_argument("config", help="training config (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (dotted path, YAML value), e.g. --set learning_rate=1e-3")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    p.add_argument("--ray", action="store_true", help="run as a Ray task (RAY_ADDRESS or a local instance)")
    p.add_argument("--gpus", type=float, default=None, help="GPUs for the Ray task (default: 1 if CUDA else 0)")
    p.add_argument("--cpus", type=float, default=1, help="CPUs for the Ray task")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.set_defaults(func=_train)

    p = subparsers.add_parser("eval", help="eval loss, perplexity and samples of a model or adapter on a dataset")
    p.add_argument("model", help="base model (name, folder, HF id) or adapter (folder, models:/name@alias, runs:/...)")
    p.add_argument("--data", required=True, help="dataset file (.jsonl/.json/.csv) or saved HF dataset folder")
    p.add_argument("--type", default="chat", choices=["chat", "alpaca", "completion"])
    p.add_argument("--base-model", help="base model for an adapter (default: its adapter_config)")
    p.add_argument("--sequence-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--samples", type=int, default=3, help="sample generations to show")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--chat-template", default=None)
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.set_defaults(func=_eval)

    p = subparsers.add_parser("merge", help="merge an adapter into its base model and save a model folder")
    p.add_argument("adapter", help="adapter folder, models:/name@alias, models:/name/N or runs:/<id>/adapter")
    p.add_argument("--output", "-o", required=True, help="folder for the merged model")
    p.add_argument("--base-model", help="base model (default: the adapter's base_model_name_or_path)")
    p.set_defaults(func=_merge)


def _user_errors():
    from serving.models import ModelNotFoundError
    from training.config import ConfigError
    from training.data import DataError
    from training.registry import AdapterNotFoundError
    from training.tracking import TrackingError
    from training.trainer import TrainingError

    return (ConfigError, DataError, TrainingError, TrackingError, AdapterNotFoundError, ModelNotFoundError)


def _train(args) -> int:
    from loraplex.cli import CLIError
    from training.config import load_config
    from training.trainer import TrainingInterrupted

    errors = _user_errors()
    try:
        cfg = load_config(args.config, args.overrides)
        if args.ray:
            from training.ray_task import run_on_ray

            result = run_on_ray(cfg, resume=args.resume, num_gpus=args.gpus, num_cpus=args.cpus)
        else:
            from training.trainer import train

            result = train(cfg, resume=args.resume, on_event=_print_event).to_dict()
    except errors as exc:
        raise CLIError(str(exc)) from None
    except TrainingInterrupted as exc:
        print(f"loraplex: {exc}", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "samples"}))
    else:
        _print_result(result)
    return 0


def _print_event(level: str, message: str, data: dict) -> None:
    if "step" in data and "loss" in data:
        return  # per-step lines are the progress bar's job
    from rich.console import Console

    Console(stderr=True).print(f"[dim]{message}[/dim]" if level == "info" else f"[yellow]{message}[/yellow]")


def _print_result(result: dict) -> None:
    from rich.console import Console

    c = Console()
    c.print(f"[bold green]done[/]: {result['steps']} steps, train loss {result['train_loss']:.4f}, "
            f"{result['tokens_per_s']:.0f} tokens/s")
    if result.get("eval_loss") is not None:
        c.print(f"eval loss {result['eval_loss']:.4f}, perplexity {result['eval_perplexity']:.2f}")
    c.print(f"adapter: {result['adapter_dir']}")
    c.print(f"MLflow run: {result['run_id']}")
    if result.get("model_uri"):
        c.print(f"registered: {result['model_uri']} (version {result['registered_version']})")
    for s in result.get("samples", []):
        c.print(f"[cyan]sample[/] {s['adapter']!r}" + (f"  [dim](base: {s['base']!r})[/]" if "base" in s else ""))


def _eval(args) -> int:
    from loraplex.cli import CLIError
    from training.config import DatasetSpec
    from training.data import build_examples, prompt_text, read_records, resolve_chat_template
    from training.evaluate import evaluate, generate, load_for_inference

    errors = _user_errors()
    try:
        spec = DatasetSpec(path=args.data, type=args.type)
        model, tokenizer, info = load_for_inference(args.model, args.base_model)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        examples = build_examples([spec], tokenizer, chat_template=args.chat_template, train_on_inputs=False,
                                  sequence_len=args.sequence_len, excess_length_strategy="truncate")
        res = evaluate(model, examples, batch_size=args.batch_size, pad_id=tokenizer.pad_token_id, device="cpu")
        template = resolve_chat_template(tokenizer, args.chat_template) if args.type != "completion" else None
        prompts = []
        for where, rec in read_records(spec.path):
            if len(prompts) >= args.samples:
                break
            prompts.append(prompt_text(tokenizer, template, rec, spec.type, where))
        outs = generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, device="cpu")
    except (*errors, ValueError) as exc:
        raise CLIError(str(exc)) from None
    result = {"model": args.model, **info, "examples": len(examples), **res,
              "samples": [{"prompt": p, "output": o} for p, o in zip(prompts, outs)]}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.model}: eval loss {res['eval_loss']:.4f}, perplexity {res['eval_perplexity']:.2f} "
          f"over {res['eval_tokens']} tokens in {len(examples)} examples")
    for s in result["samples"]:
        print(f"--- sample\n{s['output']}")
    return 0


def _merge(args) -> int:
    from loraplex.cli import CLIError
    from training.evaluate import merge_adapter

    try:
        out = merge_adapter(args.adapter, args.output, args.base_model)
    except (*_user_errors(), ValueError) as exc:
        raise CLIError(str(exc)) from None
    print(f"merged model saved: {out}")
    return 0


if __name__ == "__main__":  # `python -m training.cli ...` behaves like `loraplex ...`
    from loraplex.cli import main

    sys.exit(main(sys.argv[1:]))

