"""What a training run keeps on disk: out/checkpoint.pt (to resume exactly), out/config.json, out/metrics.csv."""
import csv
import dataclasses
import json
import os

import torch

from .config import TrainConfig
from .data import atomic_save

# Fields a resumed run may change; any other difference from the checkpoint's config is an error.
RESUMABLE_CHANGES = ("max_steps", "eval_every", "eval_batches", "log_every", "out", "backend", "device", "dtype",
                     "compile", "download")


def save_checkpoint(path, run, task, config, device):
    """Write run's model, optimizer, schedule, scaler, counters, the task's data position and the RNGs atomically."""
    cuda = device.type == "cuda"
    atomic_save({"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                 "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(), "step": run.step,
                 "config": dataclasses.asdict(config), "data": task.state(), "loss_sum": run.loss_sum.item(),
                 "loss_steps": run.loss_steps, "last_eval": run.last_eval,
                 "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if cuda
                         else torch.zeros(0, dtype=torch.uint8)}}, path)


def load_checkpoint(path, run, task, config, device):
    """Restore what save_checkpoint wrote into run and task, after checking that config may resume it."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    check_resumable(checkpoint["config"], config)
    run.model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    if run.scaler.is_enabled() and checkpoint.get("scaler"):
        run.scaler.load_state_dict(checkpoint["scaler"])
    task.load_state(checkpoint["data"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if device.type == "cuda" and checkpoint["rng"]["cuda"].numel():
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
    run.step, run.loss_steps = checkpoint["step"], checkpoint["loss_steps"]
    run.loss_sum.fill_(checkpoint["loss_sum"])
    run.last_eval = checkpoint["last_eval"]


def check_resumable(saved, config):
    """Raise ValueError naming the fields in which config differs from the checkpoint's saved config."""
    current = dataclasses.asdict(config)
    saved = {**dataclasses.asdict(TrainConfig(out="")), **saved}  # a field newer than the checkpoint: its default
    changed = sorted(name for name in current if name not in RESUMABLE_CHANGES and saved.get(name) != current[name])
    if changed:
        details = ", ".join(f"{name}: checkpoint {saved.get(name)!r}, now {current[name]!r}" for name in changed)
        raise ValueError(f"cannot resume: the config differs from the checkpoint's in {details}")


def write_config(out, config):
    """out/config.json, written atomically."""
    temporary = out / "config.json.tmp"
    temporary.write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    os.replace(temporary, out / "config.json")


def metrics_header(task):
    return ["step", "train_loss", "val_loss", task.metric, "lr", f"{task.items}_per_s", "peak_memory_mib"]


def start_metrics(path, task, keep_until_step):
    """Write metrics.csv's header, keeping the rows up to keep_until_step (a resumed run's checkpoint)."""
    rows = []
    if keep_until_step is not None and path.is_file():
        with open(path, newline="") as file:
            rows = [row for row in list(csv.reader(file))[1:] if int(row[0]) <= keep_until_step]
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", newline="") as file:
        csv.writer(file).writerows([metrics_header(task)] + rows)
    os.replace(temporary, path)


def append_metrics(path, step, evaluation, metric, lr, items_per_s, peak):
    """One row of metrics.csv from an evaluation {"train_loss", "val_loss", metric: value}; peak as text."""
    with open(path, "a", newline="") as file:
        csv.writer(file).writerow([step, f"{evaluation['train_loss']:.8g}", f"{evaluation['val_loss']:.8g}",
                                   f"{evaluation[metric]:.8g}", f"{lr:.6g}", f"{items_per_s:.1f}", peak])
