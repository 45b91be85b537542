"""Data-parallel training driver.

    torchrun --nproc-per-node=2 -m launch.train --config configs/quickstart.yaml [--set k=v ...]
    python -m launch.train --config configs/mnist_lenet300_dense.yaml      # one process
    python -m launch.train --resume runs/NAME                               # continue a run

One step: forward, backward (DDP buckets go through the communication hook: counted dense
allreduce, or DGC), optimizer step (a sparsifier, if attached, masks around it), scheduler.
Rank 0 writes ``OUT_DIR/{config.yaml,metrics.jsonl,summary.json,checkpoint.pt}`` and logs
the same records to wandb.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from launch import checkpoint, distenv, tracking
from launch.cli import OneLineParser
from launch.comm import (CountingAllreduceState, TorchHookState, counted_torch_hook,
                         counting_allreduce_hook)
from launch.config import Config, config_to_dict, load_config
from launch.costmodel import estimate_run
from launch.data import load_datasets, make_loaders
from launch.models import build_model
from sparse_comm.schema import ConfigError

log = logging.getLogger("launch.train")


def parse_args(argv=None):
    p = OneLineParser(prog="launch.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML experiment config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=0.05 (repeatable)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its checkpoint.pt")
    args = p.parse_args(argv)
    if args.config is None and args.resume is None:
        p.error("one of --config or --resume is required")
    return args


def resolve_config(args) -> tuple[Config, Path | None]:
    """The run's config, and the checkpoint to resume from (if any)."""
    if args.resume is None:
        return load_config(args.config, args.overrides), None
    run_dir = Path(args.resume)
    ckpt = run_dir / "checkpoint.pt" if run_dir.is_dir() else run_dir
    if not ckpt.is_file():
        raise ConfigError("", f"--resume: no checkpoint at {ckpt}")
    saved = yaml.safe_load((ckpt.parent / "config.yaml").read_text())
    cfg = load_config(args.config, args.overrides, base=None if args.config else saved)
    cfg.out_dir = str(ckpt.parent)
    cfg.run_name = cfg.run_name or saved.get("run_name")
    return cfg, ckpt


def lr_lambda(cfg: Config, steps_per_epoch: int, total_steps: int):
    warmup = cfg.train.lr_warmup_epochs * steps_per_epoch
    milestones = [m * total_steps for m in cfg.train.lr_milestones]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.train.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
        if cfg.train.lr_schedule == "step":
            return 0.1 ** sum(step >= m for m in milestones)
        return 1.0
    return factor


def prunable_density(model: torch.nn.Module) -> float:
    """Nonzero fraction of the weights a sparsifier may prune (tensors of 2 or more dims)."""
    weights = [p for p in model.parameters() if p.dim() >= 2]
    nonzero = sum(int(torch.count_nonzero(p)) for p in weights)
    return nonzero / max(1, sum(p.numel() for p in weights))


@torch.no_grad()
def evaluate(model, loader, device) -> tuple[float, float]:
    """Test accuracy and mean loss over the whole test set (ranks hold disjoint shards)."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        totals += torch.stack([F.cross_entropy(out, y, reduction="sum").double(),
                               (out.argmax(1) == y).sum().double(),
                               torch.tensor(float(y.numel()), dtype=torch.float64, device=device)])
    dist.all_reduce(totals)
    loss_sum, correct, count = totals.tolist()
    model.train()
    return correct / count, loss_sum / count


def mean_across_ranks(value: float, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


@contextlib.contextmanager
def _config_section(section: str):
    """Report a plugin's option error under the config key the user wrote."""
    try:
        yield
    except ConfigError as err:
        raise ConfigError(f"{section}.{err.key}" if err.key else section, err.problem) from None


def attach_plugins(cfg: Config, model: DDP, optimizer,
                   ranks_per_node: int | None = None) -> dict:
    """Register the communication hook and the sparsifier; returns them by name.
    ``ranks_per_node`` (from the launch) places the ranks on nodes, for hierarchical DGC
    and for splitting bytes into intra- and inter-node ones."""
    if cfg.engine == "horovod":
        return _attach_horovod(cfg, model, optimizer)
    plugins = {}
    if cfg.sparsity is not None:
        import sparse_train
        with _config_section("sparsity"):
            plugins["sparsity"] = sparse_train.attach(model, optimizer,
                                                      **config_to_dict(cfg.sparsity))
    if cfg.dgc is not None:
        import dgc
        options = config_to_dict(cfg.dgc)
        options["ranks_per_node"] = options["ranks_per_node"] or ranks_per_node
        with _config_section("dgc"):
            plugins["comm"] = dgc.attach(model, optimizer, sparsifier=plugins.get("sparsity"),
                                         **options)
    elif cfg.ddp.comm_hook != "allreduce":
        state = TorchHookState(cfg.ddp.comm_hook, powersgd_rank=cfg.ddp.powersgd_rank,
                               powersgd_start_iter=cfg.ddp.powersgd_start_iter,
                               ranks_per_node=ranks_per_node)
        model.register_comm_hook(state, counted_torch_hook)
        plugins["comm"] = state
    else:
        sparsifier = plugins.get("sparsity")
        state = CountingAllreduceState(sparsifier=sparsifier,
                                       model=model if sparsifier is not None else None,
                                       ranks_per_node=ranks_per_node)
        model.register_comm_hook(state, counting_allreduce_hook)
        plugins["comm"] = state
    return plugins


def launch_ranks_per_node(cfg: Config, env: distenv.DistEnv) -> int | None:
    """Ranks per node as the launch placed them (every rank's local rank, gathered); a
    one-line error when hierarchical DGC is asked for on nodes of unequal size."""
    local_ranks = [None] * env.world_size
    dist.all_gather_object(local_ranks, env.local_rank)
    nodes, per_node = distenv.node_layout(local_ranks)
    hierarchical = cfg.dgc is not None and cfg.dgc.topology == "hierarchical"
    if per_node is None and hierarchical and cfg.dgc.ranks_per_node is None:
        raise ConfigError("dgc.topology", f"'hierarchical' needs the same number of ranks on "
                                          f"every node, placed node by node; this launch "
                                          f"has local ranks {local_ranks}")
    return per_node


def _attach_horovod(cfg: Config, model: torch.nn.Module, optimizer) -> dict:
    from launch import hvd_engine
    with _config_section("dgc"):
        # First: its step pre-hook must average gradients before a sparsifier masks them.
        plugins = {"comm": hvd_engine.attach_comm(
            model, optimizer, config_to_dict(cfg.dgc) if cfg.dgc is not None else None)}
    if cfg.sparsity is not None:
        import sparse_train
        with _config_section("sparsity"):
            plugins["sparsity"] = sparse_train.attach(model, optimizer,
                                                      **config_to_dict(cfg.sparsity))
        if hasattr(plugins["comm"], "use_sparsifier"):
            plugins["comm"].use_sparsifier(plugins["sparsity"])
    return plugins


def plugin_rows(plugins: dict) -> dict:
    """Per-layer densities: weights kept by the sparsifier, gradient entries sent by DGC."""
    row = {}
    if "sparsity" in plugins:
        for name, layer in plugins["sparsity"].report()["layers"].items():
            row[f"sparsity/{name}"] = layer["density"]
    for name, density in getattr(plugins["comm"].stats, "density", {}).items():
        row[f"dgc_density/{name}"] = density
    return row


class RunWriter:
    """Rank 0's records: metrics.jsonl, summary.json and the wandb mirror of both."""

    def __init__(self, out_dir: Path, tracker: tracking.Tracker, enabled: bool):
        self.out_dir, self.tracker, self.enabled = out_dir, tracker, enabled
        self._metrics = open(out_dir / "metrics.jsonl", "a") if enabled else None

    def record(self, row: dict) -> None:
        if not self.enabled:
            return
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        self.tracker.log(row)

    def summary(self, summary: dict) -> None:
        if not self.enabled:
            return
        tmp = self.out_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        tmp.replace(self.out_dir / "summary.json")
        self.tracker.summary(summary)

    def close(self) -> None:
        if self._metrics:
            self._metrics.close()
        self.tracker.finish()


def run(cfg: Config, env: distenv.DistEnv, resume_from: Path | None, device) -> dict:
    rank0 = env.is_main
    torch.manual_seed(cfg.train.seed)
    name = [cfg.run_name or f"run-{time.strftime('%Y%m%d-%H%M%S')}"]
    dist.broadcast_object_list(name, src=0)  # every rank writes to the same run directory
    cfg.run_name = name[0]
    out_dir = Path(cfg.out_dir or Path("runs") / cfg.run_name)
    cfg.out_dir = str(out_dir)
    if rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

    train_set, test_set, info = load_datasets(cfg.data, progress=rank0)
    train_loader, sampler, test_loader = make_loaders(
        train_set, test_set, cfg.train.batch_size, env.rank, env.world_size, cfg.train.seed,
        num_workers=cfg.data.num_workers)
    steps_per_epoch = len(train_loader)
    schedule_steps = cfg.train.epochs * steps_per_epoch  # max_steps stops early, same schedule
    total_steps = min(schedule_steps, cfg.train.max_steps or schedule_steps)

    model = build_model(cfg.model, info.input_shape, info.num_classes).to(device)
    if cfg.engine == "horovod":
        if env.launcher != "horovod":
            raise ConfigError("engine", f"'horovod' needs horovodrun; this is a "
                                        f"{env.launcher} launch (use engine: ddp)")
        from launch.hvd_engine import broadcast_parameters
        broadcast_parameters(model)
        ddp = model
    else:
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                  bucket_cap_mb=cfg.ddp.bucket_cap_mb, static_graph=cfg.ddp.static_graph,
                  find_unused_parameters=cfg.ddp.find_unused_parameters)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum,
                                nesterov=cfg.train.nesterov, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg, steps_per_epoch, schedule_steps))
    plugins = attach_plugins(cfg, ddp, optimizer, launch_ranks_per_node(cfg, env))
    comm = plugins["comm"]
    if hasattr(comm, "set_total_steps"):  # DGC's warmup_fraction is of the planned run
        comm.set_total_steps(schedule_steps)

    progress = {"epoch": 0, "batch": 0, "step": 0, "wall_time_s": 0.0, "loss_sum": 0.0}
    if resume_from is not None:
        state = checkpoint.load(resume_from)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        for key, plugin in plugins.items():
            plugin_state = state["plugins"][key]
            plugin.load_state_dict(plugin_state[env.rank] if isinstance(plugin_state, list)
                                   else plugin_state)
        checkpoint.set_rng_state(state["rng"][env.rank])
        progress = state["progress"]
        log.info("resumed %s at epoch %d, step %d", resume_from, progress["epoch"], progress["step"])

    tracker = tracking.Tracker()
    if rank0:
        tracker = tracking.start(cfg.wandb.mode, cfg.wandb.project, cfg.run_name, out_dir,
                                 config_to_dict(cfg), group=cfg.wandb.group,
                                 entity=cfg.wandb.entity, tags=cfg.wandb.tags)
    writer = RunWriter(out_dir, tracker, rank0)

    def save_checkpoint():
        per_rank = [None] * env.world_size
        dist.all_gather_object(per_rank, {
            "rng": checkpoint.rng_state(),
            "comm": comm.state_dict()})  # DGC residuals differ per rank
        if rank0:
            plugin_states = {key: p.state_dict() for key, p in plugins.items()}
            plugin_states["comm"] = [r["comm"] for r in per_rank]
            checkpoint.save_atomic({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "plugins": plugin_states,
                "rng": [r["rng"] for r in per_rank], "progress": dict(progress),
                "config": config_to_dict(cfg)}, out_dir / "checkpoint.pt")

    def comm_row() -> dict:
        return {tracking.BYTES_AXIS: comm.stats.bytes_sent,
                "comm/bytes_dense_cum": comm.stats.bytes_dense,
                "comm/bytes_intra_node_cum": comm.stats.bytes_intra,
                "comm/bytes_inter_node_cum": comm.stats.bytes_inter}

    show_bars = rank0 and sys.stderr.isatty()  # logs of batch jobs stay readable
    started = time.perf_counter() - progress["wall_time_s"]
    # the last evaluation's figures: a run resumed after its last epoch reports them
    test_acc, test_loss, train_loss = (progress.get(k, float("nan")) for k in
                                       ("test_accuracy", "test_loss", "train_loss"))
    step = progress["step"]
    for epoch in range(progress["epoch"], cfg.train.epochs):
        if step >= total_steps:
            break
        sampler.set_epoch(epoch)
        for plugin in plugins.values():
            if hasattr(plugin, "set_epoch"):
                plugin.set_epoch(epoch)
        skip, progress["epoch"] = progress["batch"], epoch
        bar = tqdm(total=steps_per_epoch, initial=skip, disable=not show_bars, leave=False,
                   desc=f"epoch {epoch + 1}/{cfg.train.epochs}", mininterval=1.0)
        for batch, (x, y) in enumerate(train_loader):
            if batch < skip:
                continue
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(ddp(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            loss_value = loss.item()
            progress.update(batch=batch + 1, step=step, loss_sum=progress["loss_sum"] + loss_value)
            bar.update(1)
            if step % cfg.train.log_every == 0:
                bar.set_postfix(loss=f"{loss_value:.4f}")
                writer.record({tracking.STEP_AXIS: step, "train/loss": loss_value,
                               "train/lr": scheduler.get_last_lr()[0], "epoch": epoch,
                               **comm_row()})
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                progress["wall_time_s"] = time.perf_counter() - started
                save_checkpoint()
            if step >= total_steps:
                break
        bar.close()
        batches = progress["batch"]
        train_loss = mean_across_ranks(progress["loss_sum"] / max(1, batches), device)
        test_acc, test_loss = evaluate(ddp, test_loader, device)
        epoch_done = batches == steps_per_epoch
        progress.update(test_accuracy=test_acc, test_loss=test_loss, train_loss=train_loss)
        progress.update(epoch=epoch + 1 if epoch_done else epoch,
                        batch=0 if epoch_done else batches,
                        loss_sum=0.0 if epoch_done else progress["loss_sum"],
                        wall_time_s=time.perf_counter() - started)
        writer.record({tracking.STEP_AXIS: step, "epoch/index": epoch + 1,
                       "epoch/train_loss": train_loss, "test/accuracy": test_acc,
                       "test/loss": test_loss, "epoch/weight_density": prunable_density(model),
                       "epoch/wall_time_s": progress["wall_time_s"], **comm_row(),
                       **plugin_rows(plugins)})
        if rank0:
            log.info("epoch %d: train loss %.4f, test accuracy %.4f, %.1f MB sent",
                     epoch + 1, train_loss, test_acc, comm.stats.bytes_sent / 1e6)
        save_checkpoint()

    summary = {
        "test_accuracy": test_acc, "test_loss": test_loss, "train_loss": train_loss,
        "epochs": step / steps_per_epoch, "steps": step, "world_size": env.world_size,
        "wall_time_s": time.perf_counter() - started,
        "comm_bytes_sent": comm.stats.bytes_sent, "comm_bytes_dense": comm.stats.bytes_dense,
        "comm_bytes_intra_node": comm.stats.bytes_intra,
        "comm_bytes_inter_node": comm.stats.bytes_inter,
        "compression_ratio": comm.stats.bytes_dense / comm.stats.bytes_sent
        if comm.stats.bytes_sent else None,  # None: one process sends nothing
        "weight_density": prunable_density(model),
        "parameters": sum(p.numel() for p in model.parameters()),
        "run_name": cfg.run_name,
    }
    if cfg.quantize is not None:  # Deep Compression stages: launch/deep_compression.py
        from launch.deep_compression import compress
        summary.update(compress(cfg, ddp, optimizer, plugins, train_loader, sampler,
                                lambda m: evaluate(m, test_loader, device), writer,
                                info.input_shape, info.num_classes))
    if rank0:
        summary.update(estimate_run(
            cfg, model, world_size=env.world_size,
            comm_bytes_per_step=comm.stats.bytes_sent / step if step else None,
            masks=plugins["sparsity"].masks if "sparsity" in plugins else None))
    writer.summary(summary)
    writer.close()
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        env = distenv.detect()
        logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING,
                            format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        cfg, resume_from = resolve_config(args)
    except ConfigError as err:
        print(f"launch.train: error: {err}", file=sys.stderr)
        return 2
    device = distenv.init(env)
    try:
        summary = run(cfg, env, resume_from, device)
    except ConfigError as err:  # e.g. a sparsity layer pattern that matches no parameter
        print(f"launch.train: error: {err}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()
    if env.is_main:
        print(json.dumps({k: summary[k] for k in ("test_accuracy", "steps", "wall_time_s",
                                                   "comm_bytes_sent", "weight_density")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
