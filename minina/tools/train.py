"""`python -m minina train`: one small, resumable training loop for the paper's two experiments.

task "lm": a TransformerLM on next-token prediction (validation loss and perplexity); task "vit": a
VisionTransformer on image classification (validation loss and accuracy). AdamW (weight decay on Linear and Conv
weights only), linear warmup then cosine decay, gradient clipping, gradient accumulation, autocast (bf16 on GPUs
that have it, fp16 with a gradient scaler on older ones, fp32 on CPU), optional torch.compile,
DistributedDataParallel when launched by torchrun (NCCL on GPUs, gloo on CPU). The step never waits for the device:
losses are summed on it and read back every log_every steps (progress bar) and at evaluations. Every eval_every
steps: evaluate, append a row to out/metrics.csv, write out/checkpoint.pt atomically. Ctrl-C finishes the current
step, saves a checkpoint and stops; resume=True continues exactly where it stopped.
"""
import argparse
import contextlib
import dataclasses
import functools
import gc
import inspect
import json
import math
import os
import pathlib
import signal
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

from ..attention import check_backend
from ..models import MODEL_KINDS
from ..scores import REJECTED_SCORE_OPTIONS, RELIABLE_SCORE_OPTIONS, NeuralScore
from .checkpoint import append_metrics, load_checkpoint, save_checkpoint, start_metrics, write_config
from .config import DTYPES, TrainConfig
from .train_flags import add_config_flags, config_from_args
from .train_tasks import TRAIN_TASKS

HELP = "train a language model or a ViT with dot, neural or hybrid attention (resumable, torchrun-ready)"
MIB = 2 ** 20


def build_model(config, vocab_size=None, num_classes=None, image_size=None, channels=None):
    """The TransformerLM (task "lm", needs vocab_size) or VisionTransformer (task "vit") that config describes.

    For vit, image_size and channels are the data's; config.image_size, when set, overrides image_size. config is
    checked first (train() checks it once and builds its model with the task's build_model directly).
    """
    check_config(config)
    sizes = dict(vocab_size=vocab_size, num_classes=num_classes, image_size=image_size, channels=channels)
    return TRAIN_TASKS[config.task].build_model(config, sizes)


class ConfigError(ValueError):
    """A TrainConfig value that cannot work: on the command line, a usage error (exit code 2)."""


def check_config(config):
    """Raise ConfigError (a ValueError) naming the field when a TrainConfig value cannot work.

    train() calls it once, before anything else (then check_device); a config that passes builds its model.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    try:
        _check_values(config)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _check_values(config):
    """Raise ValueError naming the field whose value cannot work anywhere."""
    if config.task not in TRAIN_TASKS:
        raise ValueError(f"task must be one of {tuple(TRAIN_TASKS)}, got {config.task!r}")
    if config.kind not in MODEL_KINDS:
        raise ValueError(f"kind must be one of {MODEL_KINDS}, got {config.kind!r}")
    TRAIN_TASKS[config.task].check_dataset(config.dataset)
    for name in ("dim", "depth", "heads", "seq_len", "batch_size", "grad_accum", "max_steps", "eval_every",
                 "log_every", "patch_size"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    for name in ("eval_batches", "image_size", "train_size", "proj_dim"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    if config.dim % config.heads:
        raise ValueError(f"dim ({config.dim}) must be divisible by heads ({config.heads})")
    if not config.lr > 0:
        raise ValueError(f"lr must be > 0, got {config.lr!r}")
    for name in ("weight_decay", "grad_clip", "warmup_steps"):
        if not getattr(config, name) >= 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(config, name)!r}")
    if not 0 <= config.dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {config.dropout!r}")
    _check_score_options(config)
    check_backend(config.backend)
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {config.dtype!r}")
    if not isinstance(config.compile, bool):
        raise ValueError(f"compile must be a bool, got {config.compile!r}")
    if config.device != "auto":
        try:
            torch.device(config.device)
        except RuntimeError:
            raise ValueError(f"device must be 'auto' or a torch device such as 'cpu' or 'cuda:0', "
                             f"got {config.device!r}") from None


def _check_score_options(config):
    """score_options must be keyword arguments NeuralScore takes, with values it accepts."""
    options = config.score_options
    if options is None:
        return
    if not isinstance(options, dict):
        raise ValueError(f"score_options must be a dict or None, got {type(options).__name__}")
    rejected = [name for name in options if name in REJECTED_SCORE_OPTIONS]
    rejected += ["activation='leaky_relu'"] if options.get("activation") == "leaky_relu" else []
    hint = (f"; {', '.join(rejected)}: rejected by the learnability study, only its probes take "
            f"{'it' if len(rejected) == 1 else 'them'} (minina.tools.candidates)" if rejected else "")
    known = [name for name in inspect.signature(NeuralScore).parameters if name not in ("head_dim", "proj_dim")]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"score_options has unknown key(s) {unknown}: NeuralScore takes {known} (proj_dim has its "
                         f"own flag), e.g. {json.dumps(RELIABLE_SCORE_OPTIONS)}{hint}")
    try:
        NeuralScore(config.dim // config.heads, config.proj_dim, **options)
    except (TypeError, ValueError) as error:
        raise ValueError(f"score_options {options}: {error}{hint}") from None


def check_device(device):
    """Raise ConfigError when device ("auto" or a torch device) names a GPU this machine does not have."""
    if device == "auto" or torch.device(device).type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} needs a CUDA GPU, but torch.cuda.is_available() is False here (no "
                          "NVIDIA GPU or driver, or a CPU-only PyTorch); use --device cpu, or auto to take a GPU "
                          "where there is one")
    index = torch.device(device).index
    if index is not None and index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"numbered from 0")


def learning_rate_factor(step, warmup_steps, max_steps, final_factor=0.1):
    """Multiplier of lr at step: linear warmup to 1 over warmup_steps, then cosine decay to final_factor."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def autocast_dtype(dtype, device_type, capability=None):
    """The torch dtype that config.dtype means on a device; torch.float32 means no autocast.

    "auto": bf16 on CUDA GPUs of compute capability (major, minor) >= (8, 0) (A100, H100, RTX 30xx and later),
    fp16 on older ones (T4, V100: no bf16; the loop adds a gradient scaler), fp32 on any other device.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if device_type == "cuda" and capability is None:
        raise ValueError("autocast_dtype needs the GPU's capability, e.g. torch.cuda.get_device_capability(device)")
    has_bf16 = device_type != "cuda" or tuple(capability) >= (8, 0)
    if dtype == "auto":
        return torch.float32 if device_type != "cuda" else torch.bfloat16 if has_bf16 else torch.float16
    if dtype == "bf16" and not has_bf16:
        raise ValueError(f"dtype 'bf16' needs a GPU of compute capability 8.0 or more, this one has "
                         f"{'.'.join(map(str, capability))}; use --dtype fp16 (or auto)")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]


DECAYED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def make_optimizer(model, config):
    """AdamW (betas 0.9, 0.95, as the paper's code) with config.weight_decay on Linear and Conv weights only.

    Biases, LayerNorms, embeddings (token and position, the ViT's cls_token and pos_emb), the score MLP's biases
    and any other parameter get no decay; a weight shared with an embedding (the LM's tied output head) counts
    as the embedding. Fused AdamW when every parameter is on CUDA.
    """
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, DECAYED_LAYERS)}
    decayed -= {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    parameters = [p for p in model.parameters() if p.requires_grad]  # each shared tensor once
    groups = [{"params": [p for p in parameters if id(p) in decayed], "weight_decay": config.weight_decay},
              {"params": [p for p in parameters if id(p) not in decayed], "weight_decay": 0.0}]
    fused = bool(parameters) and all(p.is_cuda for p in parameters)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), fused=fused or None)


def train(config, resume=False, progress=True, stop_after=None):
    """Train as config says; returns a summary dict.

    Summary: val_loss, perplexity (lm) or accuracy (vit) of the last evaluation, train_loss (mean over the last
    evaluation interval), params, seconds_per_step (this session), steps, out, stopped_early, interrupted (by
    Ctrl-C or SIGTERM). Writes out/config.json, out/metrics.csv and out/checkpoint.pt. resume=True continues from
    out/checkpoint.pt exactly as if never stopped. stop_after=N pauses after step N (keeping the schedule of
    max_steps), like a Ctrl-C there.
    """
    check_config(config)  # the one check of a run, the command line's included
    check_device(config.device)
    if stop_after is not None and (not isinstance(stop_after, int) or stop_after < 1):
        raise ValueError(f"stop_after must be a positive int or None, got {stop_after!r}")
    out = pathlib.Path(config.out)
    checkpoint_path = out / "checkpoint.pt"
    if resume and not checkpoint_path.is_file():
        raise FileNotFoundError(f"resume: no checkpoint at {checkpoint_path}; run without --resume to start")
    rank, world, device = _distributed_setup(config)
    try:
        if config.batch_size % world:
            raise ValueError(f"batch_size ({config.batch_size}) must be divisible by the number of processes "
                             f"({world})")
        summary = _train(config, resume, progress and rank == 0, stop_after, rank, world, device, out, checkpoint_path)
        if world > 1:
            dist.barrier()  # no rank tears down its connections while another may still be using them
        return summary
    finally:
        if world > 1:
            dist.destroy_process_group()
            # DDP's reducer holds the process group in a reference cycle: free it now, while the interpreter is
            # alive, or gloo's threads are torn down at exit ("terminate called without an active exception")
            gc.collect()


@dataclasses.dataclass
class _Run:
    """What the loop updates at every step, and a checkpoint keeps."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    loss_sum: torch.Tensor  # on the device, since the last evaluation: summing never waits for the device
    last_eval: dict
    step: int = 0
    loss_steps: int = 0


def _train(config, resume, progress, stop_after, rank, world, device, out, checkpoint_path):
    """The loop: set up (or resume) the run, then step; every eval_every steps evaluate, log and checkpoint."""
    torch.manual_seed(config.seed)
    amp_dtype = autocast_dtype(config.dtype, device.type,
                               torch.cuda.get_device_capability(device) if device.type == "cuda" else None)
    if device.type == "cuda":  # TF32 tensor cores for the fp32 matmuls and convolutions left outside autocast
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    task = TRAIN_TASKS[config.task](config, rank, world, device)
    run = _new_run(config, task, device, amp_dtype)
    if resume:
        load_checkpoint(checkpoint_path, run, task, config, device)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_config(out, config)
        start_metrics(out / "metrics.csv", task, run.step if resume else None)
    trained, distributed = _wrap(run.model, config, world, device)
    autocast = functools.partial(_autocast, device.type, amp_dtype)
    end = min(config.max_steps, stop_after or config.max_steps)
    bar = tqdm(total=config.max_steps, initial=run.step, desc=f"{config.task} {config.kind}", unit="step",
               disable=not progress)
    clock = _Clock(device)
    with _StopOnInterrupt() as interrupt:
        while run.step < end and not _stop_requested(interrupt, run.step, config, world, device):
            lr = run.scheduler.get_last_lr()[0]
            _train_step(run, trained, distributed, task, config, autocast)
            clock.steps_done(1)
            bar.update(1)
            if progress and run.step % config.log_every == 0:
                bar.set_postfix(loss=f"{(run.loss_sum / run.loss_steps).item():.3f}", refresh=False)
            if run.step % config.eval_every == 0 or run.step == config.max_steps:
                trained.eval()
                items_per_s, peak = _evaluate(run, task, autocast, clock, world)
                bar.set_postfix(loss=f"{run.last_eval['train_loss']:.3f}", val_loss=f"{run.last_eval['val_loss']:.3f}")
                if rank == 0:
                    append_metrics(out / "metrics.csv", run.step, run.last_eval, task.metric, lr, items_per_s, peak)
                    save_checkpoint(checkpoint_path, run, task, config, device)
                clock.restart()
        clock.stop()
        stopped_early = run.step < config.max_steps
        if stopped_early and rank == 0:
            save_checkpoint(checkpoint_path, run, task, config, device)
    bar.close()
    summary = {**run.last_eval, "params": sum(p.numel() for p in run.model.parameters()),
               "seconds_per_step": clock.seconds / max(1, clock.steps), "steps": run.step, "out": str(out),
               "stopped_early": stopped_early, "interrupted": stopped_early and run.step < end}
    if progress:
        print(summary_line(summary), flush=True)
    return summary


def _new_run(config, task, device, amp_dtype):
    """A fresh model with its optimizer (AdamW), schedule (warmup, cosine) and gradient scaler (fp16 only)."""
    model = task.build_model(config, task.model_sizes).to(device)  # config checked by train()
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, config.warmup_steps, config.max_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # fp16 gradients underflow
    return _Run(model, optimizer, scheduler, scaler, torch.zeros((), dtype=torch.float64, device=device),
                {"val_loss": None, task.metric: None, "train_loss": None})


def _wrap(model, config, world, device):
    """(the module the steps run, the DistributedDataParallel wrapper or None): DDP under torchrun, then compile."""
    distributed = None if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    trained = model if distributed is None else distributed
    return (torch.compile(trained) if config.compile else trained), distributed


def _autocast(device_type, amp_dtype):
    enabled = amp_dtype != torch.float32
    return torch.autocast(device_type, dtype=amp_dtype if enabled else None, enabled=enabled)


def _train_step(run, trained, distributed, task, config, autocast):
    """One optimizer step over config.grad_accum micro-batches: forward, backward, clip, step, schedule."""
    trained.train()
    for micro in range(config.grad_accum):
        batch = task.train_batch()
        last = micro == config.grad_accum - 1  # under DDP, gradients are averaged over processes once per step
        with contextlib.nullcontext() if distributed is None or last else distributed.no_sync():
            with autocast():
                loss, _ = task.loss(trained, batch)
            run.scaler.scale(loss / config.grad_accum).backward()
        run.loss_sum += loss.detach().double() / config.grad_accum  # on the device: no wait
    if config.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.step, run.loss_steps = run.step + 1, run.loss_steps + 1


def _evaluate(run, task, autocast, clock, world):
    """Mean training loss since the last evaluation (over all processes) and the validation measures, into
    run.last_eval; returns (items per second over the interval, peak GPU memory in MiB or "")."""
    train_loss = torch.stack([run.loss_sum, torch.tensor(float(run.loss_steps), dtype=torch.float64,
                                                         device=run.loss_sum.device)])
    if world > 1:
        dist.all_reduce(train_loss)
    train_loss = (train_loss[0] / train_loss[1]).item()  # waits for the device: time the interval
    items_per_s, peak = clock.lap(task.items_per_step)
    val_loss, metric = task.evaluate(run.model, autocast)
    run.last_eval = {"val_loss": val_loss, task.metric: metric, "train_loss": train_loss}
    run.loss_sum.zero_()
    run.loss_steps = 0
    return items_per_s, peak


def _stop_requested(interrupt, step, config, world, device):
    """All processes must stop after the same step: they agree every log_every steps."""
    if world == 1:
        return interrupt.requested
    if step % config.log_every:
        return False
    flag = torch.tensor([float(interrupt.requested)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


class _Clock:
    """Wall-clock time of the steps, read only where the host waits for the device anyway, and peak GPU memory."""

    def __init__(self, device):
        self.device, self.cuda = device, device.type == "cuda"
        self.seconds, self.steps, self.interval_steps = 0.0, 0, 0  # this session; since the last lap
        self.restart()

    def restart(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.started = time.perf_counter()

    def steps_done(self, count):
        self.steps, self.interval_steps = self.steps + count, self.interval_steps + count

    def lap(self, items_per_step):
        """(items per second since restart, peak GPU memory in MiB or "" on CPU); call after the device is done."""
        seconds = time.perf_counter() - self.started
        peak = f"{torch.cuda.max_memory_allocated(self.device) / MIB:.1f}" if self.cuda else ""
        self.seconds += seconds
        items_per_s = items_per_step * self.interval_steps / seconds
        self.interval_steps = 0
        return items_per_s, peak

    def stop(self):
        """Count the steps after the last lap."""
        if self.interval_steps:
            if self.cuda:
                torch.cuda.synchronize(self.device)
            self.seconds += time.perf_counter() - self.started


def _distributed_setup(config):
    """(rank, world_size, device); joins the process group when launched by torchrun."""
    cuda = config.device == "auto" and torch.cuda.is_available() or config.device.startswith("cuda")
    if "RANK" not in os.environ:
        return 0, 1, torch.device(("cuda" if cuda else "cpu") if config.device == "auto" else config.device)
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank) if cuda else torch.device("cpu")


class _StopOnInterrupt:
    """While active, the first Ctrl-C (SIGINT) or SIGTERM (torchrun, schedulers) only sets .requested, so the loop
    can stop at a step boundary; a second one acts as usual."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested, self.previous = False, {}

    def __enter__(self):
        try:
            self.previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}
        except ValueError:  # not the main thread: leave the signals alone
            self.previous = {}
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signum, self.previous[signum])

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def summary_line(summary):
    """One line that says how a run ended."""
    if summary["val_loss"] is None:
        evaluation = "not evaluated yet"
    elif "perplexity" in summary:
        evaluation = f"val_loss {summary['val_loss']:.4f}, perplexity {summary['perplexity']:.2f}"
    else:
        evaluation = f"val_loss {summary['val_loss']:.4f}, accuracy {100 * summary['accuracy']:.1f}%"
    state = ("interrupted; " if summary["interrupted"] else "") + (
        "paused, continue with --resume; " if summary["stopped_early"] else "")
    return (f"{state}step {summary['steps']}: {evaluation}, {summary['params']:,} parameters, "
            f"{summary['seconds_per_step']:.3f} s/step -> {summary['out']}")


def add_arguments(parser):
    add_config_flags(parser)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--stop-after", type=int, metavar="STEPS",
                        help="pause after this many steps (schedule still for --max-steps); continue with --resume")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads (default when training on the CPU: 1, the fastest for minina's CPU-sized "
                             "models, which thrash on a busy machine with more; otherwise PyTorch's)")


def main(args):
    if args.threads is not None and args.threads < 1:
        raise argparse.ArgumentError(None, f"--threads must be at least 1, got {args.threads}")
    config = config_from_args(args)  # checked by train(), once
    on_cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    threads = args.threads if args.threads is not None else 1 if on_cpu else None
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        summary = train(config, resume=args.resume, stop_after=args.stop_after)
    except ConfigError as error:  # a mistake in the flags: one line and exit code 2, as argparse's own
        raise argparse.ArgumentError(None, str(error)) from None
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    if summary["interrupted"]:
        raise SystemExit(130)  # the shell's code for Ctrl-C; the checkpoint is saved
