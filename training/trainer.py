"""The LoRA/QLoRA training recipe: a plain torch loop (torchtune-style) with accelerate for devices.

    result = train(load_config("configs/train/smollm2-acme-support.yaml"))

Order of work: validate environment and data, check the tracking server, load the model, then start (or
continue) the MLflow run, train, save, log, register. Every step of the loop is a pure function of the
seed and the step number (data order, RNG state), so `resume=True` from a checkpoint ends with the same
adapter as an uninterrupted run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import shutil
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from training.config import TrainConfig, dump_config
from training.data import DataStats, build_examples, collate, dataset_hash, pack, prompt_text, read_records, split_eval

STATE_FILE = "training_state.pt"


class TrainingError(RuntimeError):
    """A setup problem found before or during training (reported without a traceback)."""


class TrainingInterrupted(RuntimeError):
    """Training stopped early (Ctrl-C, SIGTERM, cancel); the last checkpoint can be resumed."""


@dataclass
class TrainResult:
    run_id: str
    output_dir: str
    adapter_dir: str
    steps: int
    train_loss: float | None
    eval_loss: float | None = None
    eval_perplexity: float | None = None
    tokens: int = 0
    tokens_per_s: float = 0.0
    registered_name: str | None = None
    registered_version: str | None = None
    model_uri: str | None = None
    samples: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


EventFn = Callable[[str, str, dict], None]  # (level, message, data)


def _no_events(level: str, message: str, data: dict) -> None:
    return None


# ---------------------------------------------------------------- preflight
def check_environment(cfg: TrainConfig) -> None:
    """QLoRA needs CUDA and bitsandbytes; say so before anything loads."""
    import torch

    if cfg.adapter == "qlora":
        missing = []
        if not torch.cuda.is_available():
            missing.append("a CUDA GPU (none is visible to torch here)")
        if importlib.util.find_spec("bitsandbytes") is None:
            missing.append("the bitsandbytes package (pip install 'loraplex[gpu]' or pip install bitsandbytes)")
        if missing:
            raise TrainingError("adapter: qlora loads the base model in 4-bit with bitsandbytes, which needs "
                                + " and ".join(missing) + ". Use adapter: lora on this machine.")
    if cfg.fp16 and not torch.cuda.is_available():
        raise TrainingError("fp16: true needs a CUDA GPU; use bf16: true (or neither) on CPU")


def linear_module_names(model_path: str) -> list[str]:
    """Leaf names of the Linear layers of a model, built on the meta device (no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(names)


def check_target_modules(cfg: TrainConfig, model_path: str) -> None:
    if cfg.lora_target_modules == "all-linear":
        return
    available = linear_module_names(model_path)
    unknown = [m for m in cfg.lora_target_modules if m not in available]
    if unknown:
        raise TrainingError(f"lora_target_modules: {', '.join(map(repr, unknown))} matches no Linear layer of "
                            f"{cfg.base_model}; its Linear layers are: {', '.join(available)}")


def _mixed_precision(cfg: TrainConfig) -> str:
    import torch

    if cfg.fp16:
        return "fp16"
    if cfg.bf16 == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cfg.bf16 else "no"


# ---------------------------------------------------------------- checkpoints
def checkpoints_dir(cfg: TrainConfig) -> Path:
    return cfg.resolved_output_dir / "checkpoints"


def last_checkpoint(cfg: TrainConfig) -> Path | None:
    root = checkpoints_dir(cfg)
    found = sorted((p for p in root.glob("step-*") if (p / STATE_FILE).exists()),
                   key=lambda p: int(p.name.split("-")[1])) if root.exists() else []
    return found[-1] if found else None


def _save_checkpoint(cfg, model, optimizer, scheduler, step, run_id, fingerprint) -> Path:
    """Adapter + optimizer/scheduler/RNG state + step, written to a temp folder then renamed (atomic)."""
    import numpy as np
    import torch

    root = checkpoints_dir(cfg)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step}-", dir=root))
    model.save_pretrained(tmp, safe_serialization=True)
    state = {
        "step": step, "run_id": run_id, "fingerprint": fingerprint,
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    torch.save(state, tmp / STATE_FILE)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    kept = sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    for old in kept[: -cfg.save_total_limit]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _restore_rng(rng: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


# ---------------------------------------------------------------- schedule of data
class MicroBatches:
    """Micro-batch k of the infinite stream: epoch = k // per_epoch, order = a seeded permutation per epoch."""

    def __init__(self, rows, micro_batch_size: int, seed: int):
        self.rows, self.mbs, self.seed = rows, micro_batch_size, seed
        self.per_epoch = math.ceil(len(rows) / micro_batch_size)
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            self._orders = {epoch: random.Random(self.seed * 1_000_003 + epoch).sample(range(len(self.rows)),
                                                                                    len(self.rows))}
        return self._orders[epoch]

    def __getitem__(self, k: int):
        epoch, j = divmod(k, self.per_epoch)
        idx = self._order(epoch)[j * self.mbs: (j + 1) * self.mbs]
        return [self.rows[i] for i in idx], epoch


def total_steps(cfg: TrainConfig, micro_per_epoch: int, world: int) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    per_step = cfg.gradient_accumulation_steps * world
    return max(1, math.ceil(cfg.num_epochs * micro_per_epoch / per_step))


# ---------------------------------------------------------------- the recipe
def prepare_data(cfg: TrainConfig, tokenizer):
    """(train rows, eval examples, stats, sample prompts) from the config's datasets."""
    stats = DataStats()
    kw = dict(chat_template=cfg.chat_template, train_on_inputs=cfg.train_on_inputs, sequence_len=cfg.sequence_len,
              excess_length_strategy=cfg.excess_length_strategy)
    train_ex = build_examples(cfg.datasets, tokenizer, stats=stats, **kw)
    if cfg.eval_datasets:
        eval_ex = build_examples(cfg.eval_datasets, tokenizer, **kw)
    else:
        train_ex, eval_ex = split_eval(train_ex, cfg.val_set_size, cfg.seed)
    rows = pack(train_ex, cfg.sequence_len) if cfg.sample_packing else train_ex
    return rows, eval_ex, stats, _sample_prompts(cfg, tokenizer)


def _sample_prompts(cfg: TrainConfig, tokenizer) -> list[str]:
    from training.data import resolve_chat_template

    if cfg.num_sample_generations == 0:
        return []
    template = None
    if cfg.sample_prompts is not None:
        template = resolve_chat_template(tokenizer, cfg.chat_template)
        return [tokenizer.apply_chat_template([{"role": "user", "content": p}], chat_template=template,
                                              tokenize=False, add_generation_prompt=True)
                for p in cfg.sample_prompts[: cfg.num_sample_generations]]
    prompts: list[str] = []
    for spec in cfg.eval_datasets or cfg.datasets:
        if spec.type != "completion" and template is None:
            template = resolve_chat_template(tokenizer, cfg.chat_template)
        for where, rec in read_records(spec.path, spec.split):
            prompts.append(prompt_text(tokenizer, template, rec, spec.type, where))
            if len(prompts) >= cfg.num_sample_generations:
                return prompts
    return prompts


def _load_model(cfg: TrainConfig, model_path: str, accelerator):
    import torch
    from transformers import AutoModelForCausalLM

    if cfg.adapter == "qlora":
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=compute)
        model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=quant, dtype=compute,
                                                     device_map={"": accelerator.local_process_index})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    model.config.use_cache = False
    return model


def _optimizer(cfg: TrainConfig, params):
    import torch

    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=0.9, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def base_repo_id(cfg: TrainConfig, model_path: str | Path) -> str:
    """What the adapter names as its base: the Hub repo id where known (base_model_id, the default model's,
    an HF-id base_model, a folder's own repo id), so the adapter loads in PEFT and vLLM elsewhere; else
    base_model as configured (a folder that says nothing about its origin has no better name)."""
    from serving.identity import model_identity

    return model_identity(cfg.base_model, cfg.base_model, cfg.base_model_id, path=str(model_path)).hf_id \
        or cfg.base_model


def _save_adapter(model, folder: Path, base_model: str) -> None:
    """PEFT format; base_model_name_or_path is `base_model` (see base_repo_id)."""
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder, safe_serialization=True)
    cfg_file = folder / "adapter_config.json"
    data = json.loads(cfg_file.read_text())
    data["base_model_name_or_path"] = base_model
    cfg_file.write_text(json.dumps(data, indent=2, sort_keys=True))


class _Stop:
    """SIGTERM -> stop after the current step (the job manager's cancel), like Ctrl-C."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. inside a Ray actor thread)
            self._old = None
        return self

    def _handle(self, *_):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def train(cfg: TrainConfig, *, resume: bool = False, on_event: EventFn | None = None, progress: bool = True,
          stop_after_steps: int | None = None) -> TrainResult:
    """Run the recipe. stop_after_steps interrupts after that many steps (as Ctrl-C would), for resume tests."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer, get_scheduler

    from serving.models import ModelNotFoundError, local_name, resolve_model
    from training import tracking

    emit = on_event or _no_events
    check_environment(cfg)
    try:
        model_path = resolve_model(local_name(cfg.base_model))  # the default model's repo id: the bundled copy
    except ModelNotFoundError as exc:
        raise TrainingError(f"base_model: {exc}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except OSError as exc:
        raise TrainingError(f"base_model: cannot load the tokenizer of {cfg.base_model!r}: {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows, eval_ex, stats, prompts = prepare_data(cfg, tokenizer)
    emit("info", f"data: {stats.examples} examples, {stats.tokens} tokens ({stats.trainable_tokens} trained), "
                 f"{stats.truncated} truncated, {stats.dropped} dropped; {len(eval_ex)} eval examples",
         asdict(stats))
    check_target_modules(cfg, model_path)
    tracking.check_reachable()

    ckpt = None
    fingerprint = cfg.training_fingerprint()
    if resume:
        ckpt = last_checkpoint(cfg)
        if ckpt is None:
            raise TrainingError(f"--resume: no checkpoint in {checkpoints_dir(cfg)} (set save_steps to write some)")
        state = torch.load(ckpt / STATE_FILE, weights_only=False)
        if state["fingerprint"] != fingerprint:
            raise TrainingError(f"--resume: {ckpt} was written with a different training config "
                                "(only eval/save/logging/registration settings may change on resume)")
    elif checkpoints_dir(cfg).exists():
        shutil.rmtree(checkpoints_dir(cfg))  # a fresh run: stale checkpoints must not be resumed later

    accelerator = Accelerator(mixed_precision=_mixed_precision(cfg), cpu=not torch.cuda.is_available())
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    set_seed(cfg.seed)
    model = _load_model(cfg, model_path, accelerator)
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    stream = MicroBatches(rows, cfg.micro_batch_size, cfg.seed)
    steps = total_steps(cfg, stream.per_epoch, world)
    optimizer = _optimizer(cfg, params)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=steps)
    start = 0
    if ckpt is not None:
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _restore_rng(state["rng"])
        start = state["step"]
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    pad_id = tokenizer.pad_token_id

    tracker = None
    if main:
        tracker = tracking.RunTracker(cfg.mlflow_experiment, run_id=state["run_id"] if ckpt else None,
                                      run_name=cfg.register_as)
        tracker.log_params(cfg.flat_params())
        tracker.set_tags({"base_model": cfg.base_model, "dataset_hash": dataset_hash(cfg.datasets),
                          "code_version": tracking.code_version(), "adapter": cfg.adapter,
                          "loraplex.trainable_params": str(n_trainable)})
    run_id = tracker.run_id if tracker else ""
    emit("info", f"{'resuming at step ' + str(start) if start else 'starting'}: {steps} steps, "
                 f"{n_trainable:,} trainable parameters, MLflow run {run_id}",
         {"run_id": run_id, "total_steps": steps, "start_step": start})

    bar = _Progress(steps, start, enabled=progress and main)
    last_loss, total_tokens, t_train, last_eval = None, 0, 0.0, {}
    model.train()
    try:
        with _Stop() as stop, bar:
            for step in range(start, steps):
                t0 = time.perf_counter()
                base = step * cfg.gradient_accumulation_steps * world + rank * cfg.gradient_accumulation_steps
                micro = [stream[base + j] for j in range(cfg.gradient_accumulation_steps)]
                batches = [collate(b, pad_id) for b, _ in micro]
                n_label = torch.tensor(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches), device=device)
                if world > 1:
                    n_label = accelerator.reduce(n_label, "sum")
                denom = max(int(n_label), 1)
                loss_total = 0.0
                n_tokens = sum(len(e.input_ids) for b, _ in micro for e in b)
                for j, batch in enumerate(batches):
                    batch = {k: v.to(device) for k, v in batch.items()}
                    sync = j == len(batches) - 1
                    ctx = accelerator.no_sync(model) if not sync and world > 1 else _null()
                    with ctx, accelerator.autocast():
                        loss_sum, _ = _loss(model, batch)
                        accelerator.backward(loss_sum * world / denom)  # DDP averages over ranks
                    loss_total += float(loss_sum.detach())
                lr = scheduler.get_last_lr()[0]
                if cfg.max_grad_norm:
                    grad_norm = float(accelerator.clip_grad_norm_(params, cfg.max_grad_norm))
                else:
                    grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                dt = time.perf_counter() - t0
                t_train += dt
                total_tokens += n_tokens * world
                if world > 1:
                    loss_total = float(accelerator.reduce(torch.tensor(loss_total, device=device), "sum"))
                last_loss = loss_total / denom
                done = step + 1
                metrics = {"loss": last_loss, "learning_rate": lr, "grad_norm": grad_norm,
                           "tokens_per_s": n_tokens * world / dt, "epoch": micro[-1][1] + 1}
                bar.update(done, last_loss, metrics["tokens_per_s"])
                if tracker and (done % cfg.logging_steps == 0 or done == steps):
                    tracker.log_metrics(metrics, step=done)
                    emit("info", f"step {done}/{steps}: loss {last_loss:.4f}",
                         {"step": done, **metrics, "total_steps": steps, "step_tokens": n_tokens * world,
                          "step_time_s": dt})
                if cfg.eval_steps and eval_ex and done % cfg.eval_steps == 0 and done != steps:
                    last_eval = _eval(model, eval_ex, cfg, pad_id, device, tracker, done, emit)
                if cfg.save_steps and done % cfg.save_steps == 0 and done != steps:
                    if main:
                        path = _save_checkpoint(cfg, accelerator.unwrap_model(model), optimizer, scheduler, done,
                                                run_id, fingerprint)
                        emit("info", f"checkpoint saved: {path}", {"step": done, "checkpoint": str(path)})
                    accelerator.wait_for_everyone()
                if stop.requested or (stop_after_steps is not None and done >= stop_after_steps and done != steps):
                    raise TrainingInterrupted(f"training stopped after step {done}; resume with --resume")
    except BaseException as exc:
        if tracker:
            killed = isinstance(exc, (TrainingInterrupted, KeyboardInterrupt))
            tracker.end("KILLED" if killed else "FAILED")
        raise

    unwrapped = accelerator.unwrap_model(model)
    result = TrainResult(run_id=run_id, output_dir=str(cfg.resolved_output_dir),
                         adapter_dir=str(cfg.resolved_output_dir / "adapter"), steps=steps, train_loss=last_loss,
                         tokens=total_tokens, tokens_per_s=total_tokens / t_train if t_train else 0.0)
    try:
        if eval_ex:
            last_eval = _eval(model, eval_ex, cfg, pad_id, device, tracker, steps, emit)
            result.eval_loss, result.eval_perplexity = last_eval["eval_loss"], last_eval["eval_perplexity"]
        if main:
            _finish(cfg, unwrapped, tokenizer, tracker, result, prompts, device, emit, model_path)
    except BaseException:
        if tracker:
            tracker.end("FAILED")
        raise
    return result


def _null():
    import contextlib

    return contextlib.nullcontext()


def _loss(model, batch):
    from training.evaluate import token_loss_sum

    return token_loss_sum(model, batch)


def _eval(model, eval_ex, cfg, pad_id, device, tracker, step, emit) -> dict:
    from training.evaluate import evaluate

    res = evaluate(model, eval_ex, batch_size=cfg.micro_batch_size, pad_id=pad_id, device=device)
    if tracker:
        tracker.log_metrics({"eval_loss": res["eval_loss"], "eval_perplexity": res["eval_perplexity"]}, step=step)
    emit("info", f"eval at step {step}: loss {res['eval_loss']:.4f}, perplexity {res['eval_perplexity']:.2f}",
         {"step": step, **res})
    return res


def _finish(cfg, model, tokenizer, tracker, result: TrainResult, prompts, device, emit, model_path) -> None:
    """Save the adapter, write samples, log artifacts, register, end the run."""
    from training.evaluate import sample_generations

    out = cfg.resolved_output_dir
    out.mkdir(parents=True, exist_ok=True)
    adapter_dir = out / "adapter"
    _save_adapter(model, adapter_dir, base_repo_id(cfg, model_path))
    tokenizer.save_pretrained(out / "tokenizer")
    (out / "config.yaml").write_text(dump_config(cfg))
    if prompts:
        model.config.use_cache = True
        result.samples = sample_generations(model, tokenizer, prompts, max_new_tokens=cfg.sample_max_new_tokens,
                                            device=device)
        (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in result.samples))
    (out / "result.json").write_text(json.dumps({k: v for k, v in result.to_dict().items() if k != "samples"},
                                                indent=2))
    tracker.log_artifact(out / "config.yaml")
    tracker.log_artifacts(adapter_dir, "adapter")
    tracker.log_artifacts(out / "tokenizer", "tokenizer")
    if prompts:
        tracker.log_artifact(out / "samples.jsonl")
    tracker.log_metrics({"train_tokens": result.tokens, "train_tokens_per_s": result.tokens_per_s}, step=result.steps)
    emit("info", f"adapter saved: {adapter_dir}", {"adapter_dir": str(adapter_dir)})
    if cfg.register_as:
        version = tracker.register_adapter(cfg.register_as, cfg.alias, {"base_model": cfg.base_model})
        result.registered_name, result.registered_version = cfg.register_as, version
        result.model_uri = f"models:/{cfg.register_as}@{cfg.alias}" if cfg.alias else f"models:/{cfg.register_as}/{version}"
        emit("info", f"registered {result.model_uri} (version {version})",
             {"name": cfg.register_as, "version": version, "model_uri": result.model_uri})
        (out / "result.json").write_text(json.dumps({k: v for k, v in result.to_dict().items() if k != "samples"},
                                                    indent=2))
    tracker.end("FINISHED")


class _Progress:
    """A rich progress bar: step M/N, loss, tokens/s, ETA (silent when disabled)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.enabled = enabled
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                                     TextColumn("ETA"), TimeRemainingColumn())
            self.task = self.progress.add_task("train", total=total, completed=start, loss="-", tps="-")

    def __enter__(self):
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.stop()

    def update(self, done: int, loss: float, tps: float) -> None:
        if self.enabled:
            self.progress.update(self.task, completed=done, loss=f"{loss:.4f}", tps=f"{tps:,.0f}")
