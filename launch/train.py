"""Data-parallel training driver.

    torchrun --nproc-per-node=2 -m launch.train --config configs/quickstart.yaml [--set k=v ...]
    python -m launch.train --config configs/mnist_lenet300_dense.yaml      # one process
    python -m launch.train --resume runs/NAME                               # continue a run
    torchrun --max-restarts=3 ... -m launch.train --config C --resume auto  # survive failures

One step: forward, backward (DDP buckets go through the communication hook: counted dense
allreduce, or DGC), optimizer step (a sparsifier, if attached, masks around it), scheduler.
Rank 0 writes ``OUT_DIR/{config.yaml,metrics.jsonl,summary.json}`` and logs the same records
to wandb; every rank writes its shard of ``OUT_DIR/checkpoints/`` (``launch.checkpoint``).
A run restarted by torchrun (``--max-restarts``), requeued by Slurm or rerun with
``--resume auto`` continues from its last complete checkpoint, on the same or another
number of ranks (``launch.resume``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from launch import checkpoint, distenv, resume, tracking
from launch.cli import OneLineParser
from launch.comm import (CountingAllreduceState, HierarchicalAllreduceState, TorchHookState,
                         counted_torch_hook, counting_allreduce_hook,
                         hierarchical_allreduce_hook)
from launch.config import Config, config_to_dict, load_config, read_yaml
from launch.costmodel import estimate_run
from launch.data import load_datasets, make_loaders, random_shift
from launch.divergence import Diverged, NonFiniteGuard
from launch.models import build_model
from launch.records import RunWriter, keep_rows_up_to
from sparse_comm import draws
from sparse_comm.atomic import replace_text
from sparse_comm.schema import ConfigError

log = logging.getLogger("launch.train")
AUTO = "auto"


def parse_args(argv=None):
    p = OneLineParser(prog="launch.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML experiment config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=0.05 (repeatable)")
    p.add_argument("--resume", metavar="RUN_DIR|auto",
                   help="continue the run in RUN_DIR from its last complete checkpoint; "
                        "'auto': continue the config's run if it has one, else start it")
    args = p.parse_args(argv)
    if args.config is None and args.resume in (None, AUTO):
        p.error("--config is required (unless --resume names a run directory)")
    return args


def restart_count() -> int:
    """How many times torchrun restarted this job's workers (0 on the first attempt)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def job_id() -> str | None:
    """An id that stays the same when the job is restarted: torchrun's run id (rendezvous
    id), else Slurm's job id (kept across requeues)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return run_id
    return os.environ.get("SLURM_JOB_ID")


def resolve_config(args) -> tuple[Config, str | Path | None]:
    """The run's config, and what to resume: a run directory, ``"auto"`` (the config's run
    if a checkpoint exists) or None. A torchrun restart resumes automatically."""
    if args.resume is None or args.resume == AUTO:
        cfg = load_config(args.config, args.overrides)
        stem = Path(args.config).stem
        cfg.run_name = cfg.run_name or (f"{stem}-{job_id()}" if job_id() else None)
        wants = AUTO if args.resume == AUTO or restart_count() > 0 else None
        if wants and cfg.out_dir is None and cfg.run_name is None:
            raise ConfigError("run_name", "--resume auto needs a run to find: set run_name or "
                                          "out_dir, or launch under torchrun or Slurm")
        return cfg, wants
    run_dir = Path(args.resume)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError("", f"--resume: {run_dir} is not a run directory (no config.yaml)")
    saved = read_yaml(run_dir / "config.yaml")
    if not saved:
        raise ConfigError("", f"--resume: {run_dir / 'config.yaml'} holds no config")
    cfg = load_config(args.config, args.overrides, base=None if args.config else saved)
    cfg.out_dir = str(run_dir)
    cfg.run_name = cfg.run_name or saved.get("run_name")
    return cfg, run_dir


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
        if cfg.train.on_nonfinite == "skip" or cfg.train.amp == "fp16":
            # a skipped step (ours, or a GradScaler's) must leave the residuals alone
            options["check_finite"] = True
        if cfg.train.clip_grad_norm:  # the paper's local clipping, per rank and tensor
            options["clip_norm"] = cfg.train.clip_grad_norm
        options.update(exchange_link(cfg, dist.get_world_size(), ranks_per_node))
        with _config_section("dgc"):
            plugins["comm"] = dgc.attach(model, optimizer, sparsifier=plugins.get("sparsity"),
                                         **options)
        if dist.get_rank() == 0:
            from launch.costmodel.run import topology_advice
            advice = topology_advice(cfg, dist.get_world_size(), options["ranks_per_node"])
            if advice:
                log.warning(advice)
    elif cfg.ddp.comm_hook == "hierarchical":
        if ranks_per_node is None:
            raise ConfigError("ddp.comm_hook", "'hierarchical' needs the same number of "
                                               "ranks on every node, placed node by node")
        state = HierarchicalAllreduceState(ranks_per_node)
        model.register_comm_hook(state, hierarchical_allreduce_hook)
        plugins["comm"] = state
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


def exchange_link(cfg: Config, world_size: int, ranks_per_node: int | None = None) -> dict:
    """DGC's exchange link from the run's ``hardware.preset`` (the link its pairs cross,
    which the dense fallback prices), unless the config names one; and for ``exchange:
    auto`` the exchange the cost model prices fastest for this model on that cluster
    (``launch.costmodel.run.resolve_exchange``, what ``launch.estimate`` shows)."""
    from launch.costmodel.hardware import load_cluster
    from launch.costmodel.run import resolve_exchange, with_exchange_link, workload
    cluster = load_cluster(cfg.hardware.preset)
    # a sparse intra-node stage plans its buckets over the world and allgathers across
    # nodes; the dense one exchanges its shards across nodes only
    sparse_intra = cfg.dgc.topology == "hierarchical" and cfg.dgc.intra_node == "sparse"
    sharded = cfg.dgc.topology == "hierarchical" and not sparse_intra
    options = with_exchange_link(cfg.dgc, cluster, world_size, inter_only=sharded)
    out = {"exchange_latency_us": options.exchange_latency_us,
           "exchange_gbytes": options.exchange_gbytes}
    if cfg.dgc.exchange == "auto" and world_size > 1 and not sparse_intra:
        per_node = ranks_per_node or cluster.per_node
        out["exchange"] = resolve_exchange(
            workload(cfg), "hierarchical-dgc" if sharded else "dgc",
            dataclasses.replace(cluster, per_node=per_node), world_size, cfg.hardware,
            per_node)
    return out


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


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), eps=t.eps,
                                 weight_decay=t.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum,
                           nesterov=t.nesterov, weight_decay=t.weight_decay)


def micro_steps(loader, accum: int):
    """The loader's batches in groups of ``accum``, one group per optimizer step; a
    trailing group shorter than that is dropped."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == accum:
            yield group
            group = []


def forward_backward(ddp, micro: list, device, amp, scaler, shift: int = 0,
                     key: tuple = ()) -> torch.Tensor:
    """Forward and backward of one step's micro-batches, gradients averaged over them; DDP
    (or DGC) communicates only on the last (``no_sync`` before it). ``shift``: the random
    translation of ``data.shift_pixels``, drawn from a generator keyed by ``key`` and the
    micro-step. Returns the mean loss."""
    total = torch.zeros((), device=device)
    for i, (x, y) in enumerate(micro):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if shift:
            g = torch.Generator().manual_seed(draws.integer(*key, i) % (1 << 63))
            x = random_shift(x, shift, g)
        last = i == len(micro) - 1
        sync = contextlib.nullcontext() if last or not hasattr(ddp, "no_sync") else ddp.no_sync()
        with sync:
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = F.cross_entropy(ddp(x), y) / len(micro)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach().float()
    return total


def layout(cfg: Config, plugins: dict, ranks_per_node: int | None) -> dict:
    """What a checkpoint's per-rank shards depend on besides the world size."""
    comm = "dgc" if cfg.dgc is not None else (
        cfg.ddp.comm_hook if cfg.ddp.comm_hook != "allreduce" else "allreduce")
    topology = cfg.dgc.topology if cfg.dgc is not None else "flat"
    if topology == "hierarchical" and cfg.dgc.intra_node == "sparse":
        topology = "hierarchical-sparse"  # each rank's memory covers whole tensors, as flat
    return {"comm": comm, "topology": topology,
            "ranks_per_node": getattr(plugins["comm"], "ranks_per_node", None)
            or ranks_per_node}


def rebase_schedule(scheduler, progress: dict, steps_per_epoch: int, epoch_samples: int,
                    schedule_steps: int) -> None:
    """After a change of world size: put the LR schedule at the same fraction of the run."""
    done = progress["epoch"] + progress.get("epoch_samples", 0) / max(1, epoch_samples)
    scheduler.last_epoch = round(done * steps_per_epoch)
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_lr()):
        group["lr"] = lr
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]


def run(cfg: Config, env: distenv.DistEnv, resume_from: str | Path | None, device) -> dict:
    rank0 = env.is_main
    torch.manual_seed(cfg.train.seed)
    name = [cfg.run_name or f"run-{time.strftime('%Y%m%d-%H%M%S')}"]
    dist.broadcast_object_list(name, src=0)  # every rank writes to the same run directory
    cfg.run_name = name[0]
    out_dir = Path(cfg.out_dir or Path("runs") / cfg.run_name)
    cfg.out_dir = str(out_dir)
    if rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
        replace_text(out_dir / "config.yaml", text)

    train_set, test_set, info = load_datasets(cfg.data, progress=rank0)
    train_loader, sampler, test_loader = make_loaders(
        train_set, test_set, cfg.train.batch_size, env.rank, env.world_size, cfg.train.seed,
        num_workers=cfg.data.num_workers)
    accum = cfg.train.grad_accum_steps
    steps_per_epoch = len(train_loader) // accum
    if steps_per_epoch == 0:
        raise ConfigError("train.grad_accum_steps", f"{accum} micro-batches per step, but an "
                                                    f"epoch has {len(train_loader)} per rank")
    epoch_samples = len(sampler) * env.world_size
    schedule_steps = cfg.train.epochs * steps_per_epoch  # max_steps stops early, same schedule
    # the epochs end the run; max_steps, if set, caps the optimizer steps before that
    total_steps = cfg.train.max_steps or math.inf

    model = build_model(cfg.model, info.input_shape, info.num_classes).to(device)
    if cfg.train.init_from:
        checkpoint.load_weights(model, cfg.train.init_from, "train.init_from")
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
                  find_unused_parameters=cfg.ddp.find_unused_parameters,
                  gradient_as_bucket_view=cfg.ddp.gradient_as_bucket_view)
    optimizer = build_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg, steps_per_epoch, schedule_steps))
    ranks_per_node = launch_ranks_per_node(cfg, env)
    plugins = attach_plugins(cfg, ddp, optimizer, ranks_per_node)
    comm = plugins["comm"]
    if hasattr(comm, "set_total_steps"):  # DGC's warmup_fraction is of the planned run
        comm.set_total_steps(schedule_steps)
    meta = layout(cfg, plugins, ranks_per_node)

    progress = {"epoch": 0, "epoch_samples": 0, "batches": 0, "step": 0, "wall_time_s": 0.0,
                "loss_sum": 0.0, "loss_batches": 0}
    found = None
    if resume_from is not None:
        found = checkpoint.latest(out_dir)
        if found is None and resume_from != AUTO:
            raise ConfigError("", f"--resume: no complete checkpoint under "
                                  f"{checkpoint.root(out_dir)}")
        if found is not None:
            saved_world = checkpoint.read_manifest(found)["world_size"]
            progress = resume.restore(found, model, optimizer, scheduler, plugins, meta,
                                      cfg.train.seed)
            if saved_world != env.world_size:
                rebase_schedule(scheduler, progress, steps_per_epoch, epoch_samples,
                                schedule_steps)
            log.info("resumed %s at epoch %d, step %d", found, progress["epoch"],
                     progress["step"])

    tracker = tracking.Tracker()
    if rank0 and resume_from is not None:
        keep_rows_up_to(out_dir / "metrics.jsonl", progress["step"])
    if rank0:
        tracker = tracking.start(cfg.wandb.mode, cfg.wandb.project, cfg.run_name, out_dir,
                                 config_to_dict(cfg), group=cfg.wandb.group,
                                 entity=cfg.wandb.entity, tags=cfg.wandb.tags,
                                 resuming=found is not None)
    writer = RunWriter(out_dir, tracker, rank0)
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.train.amp]
    scaler = torch.amp.GradScaler(device.type) if cfg.train.amp == "fp16" else None
    if scaler is not None and "grad_scaler" in progress:
        scaler.load_state_dict(progress["grad_scaler"])
    # a GradScaler skips overflowing steps itself: the guard then watches the loss only
    guard = NonFiniteGuard(cfg.train.on_nonfinite, device, gradients=scaler is None)

    def save_checkpoint():
        guard.check()  # never a checkpoint of non-finite weights
        progress["wall_time_s"] = time.perf_counter() - started
        # every rank restores rank 0's progress: the ranks' mean sum, then, not rank 0's own
        progress["loss_sum"] = mean_across_ranks(float(loss_sum), device)
        if scaler is not None:  # the same on every rank
            progress["grad_scaler"] = scaler.state_dict()
        progress["skipped_steps"] = progress.get("skipped_steps", 0) + guard.skipped
        guard.skipped = 0
        resume.save(out_dir, progress, model, optimizer, scheduler, plugins,
                    config_to_dict(cfg), meta)

    def comm_row() -> dict:
        row = {tracking.BYTES_AXIS: comm.stats.bytes_sent,
               "comm/bytes_dense_cum": comm.stats.bytes_dense,
               "comm/bytes_intra_node_cum": comm.stats.bytes_intra,
               "comm/bytes_inter_node_cum": comm.stats.bytes_inter}
        whole = dense_tensor_bytes()
        if whole is not None:
            row["comm/bytes_dense_tensors_cum"] = whole
        return row

    def dense_tensor_bytes() -> float | None:
        """DGC only: the bytes of the tensors sent whole beside the pairs (1-D, small)."""
        return getattr(comm.stats, "bytes_dense_tensors", None)

    show_bars = rank0 and sys.stderr.isatty()  # logs of batch jobs stay readable
    started = time.perf_counter() - progress["wall_time_s"]
    # the last evaluation's figures: a run resumed after its last epoch reports them
    test_acc, test_loss, train_loss = (progress.get(k, float("nan")) for k in
                                       ("test_accuracy", "test_loss", "train_loss"))
    step = progress["step"]
    # The epoch's losses are summed on the device and read at log steps and epoch ends:
    # a loss.item() per step would wait for the device every step.
    loss_sum = torch.tensor(progress["loss_sum"], dtype=torch.float64, device=device)
    progress.setdefault("loss_batches", progress["batches"])  # a checkpoint from before it
    for epoch in range(progress["epoch"], cfg.train.epochs):
        if step >= total_steps:
            break
        sampler.set_epoch(epoch, progress["epoch_samples"])
        for plugin in plugins.values():
            if hasattr(plugin, "set_epoch"):
                plugin.set_epoch(epoch)
        progress["epoch"] = epoch
        bar = tqdm(total=steps_per_epoch, initial=progress["batches"], disable=not show_bars,
                   leave=False, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", mininterval=1.0)
        finished = True
        for micro in micro_steps(train_loader, accum):
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None and hasattr(comm, "grad_scale"):
                comm.grad_scale = scaler.get_scale()
            loss = forward_backward(ddp, micro, device, amp, scaler, cfg.data.shift_pixels,
                                    (cfg.train.seed, env.rank, "shift", epoch,
                                     progress["epoch_samples"]))
            progress["epoch_samples"] += sum(len(y) for _, y in micro) * env.world_size
            progress["batches"] += 1
            bar.update(1)
            if scaler is not None:
                scaler.unscale_(optimizer)
            if cfg.train.clip_grad_norm and cfg.dgc is None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm)
            if guard.should_skip(step + 1, loss, model):
                optimizer.zero_grad(set_to_none=True)
                continue
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            step += 1
            progress["step"] = step
            loss_sum += loss.detach()
            progress["loss_batches"] += 1  # the steps in loss_sum: a skipped one is not
            if step % cfg.train.log_every == 0:
                guard.check()
                loss_value = loss.item()
                bar.set_postfix(loss=f"{loss_value:.4f}")
                writer.record({tracking.STEP_AXIS: step, "train/loss": loss_value,
                               "train/lr": scheduler.get_last_lr()[0], "epoch": epoch,
                               **comm_row()})
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                save_checkpoint()
            if step >= total_steps:
                # max_steps on the epoch's last step still finishes the epoch
                finished = progress["batches"] >= steps_per_epoch
                break
        bar.close()
        guard.check()
        train_loss = mean_across_ranks(float(loss_sum) / max(1, progress["loss_batches"]),
                                       device)
        test_acc, test_loss = evaluate(ddp, test_loader, device)
        progress.update(test_accuracy=test_acc, test_loss=test_loss, train_loss=train_loss)
        if finished:
            progress.update(epoch=epoch + 1, epoch_samples=0, batches=0, loss_batches=0)
            loss_sum.zero_()
        # an epoch cut short by max_steps counts its fraction, so that a resumed run's own
        # row for the whole epoch does not repeat the index
        done = epoch + 1 if finished else epoch + progress["epoch_samples"] / epoch_samples
        writer.record({tracking.STEP_AXIS: step, "epoch/index": done,
                       "epoch/train_loss": train_loss, "test/accuracy": test_acc,
                       "test/loss": test_loss, "epoch/weight_density": prunable_density(model),
                       "epoch/wall_time_s": time.perf_counter() - started, **comm_row(),
                       **plugin_rows(plugins)})
        if rank0:
            log.info("epoch %d: train loss %.4f, test accuracy %.4f, %.1f MB sent",
                     epoch + 1, train_loss, test_acc, comm.stats.bytes_sent / 1e6)
        save_checkpoint()

    summary = {
        "test_accuracy": test_acc, "test_loss": test_loss, "train_loss": train_loss,
        "epochs": progress["epoch"] + progress["epoch_samples"] / epoch_samples,
        "steps": step, "world_size": env.world_size,
        "wall_time_s": time.perf_counter() - started,
        "comm_bytes_sent": comm.stats.bytes_sent, "comm_bytes_dense": comm.stats.bytes_dense,
        "comm_bytes_dense_tensors": dense_tensor_bytes(),
        "comm_bytes_intra_node": comm.stats.bytes_intra,
        "comm_bytes_inter_node": comm.stats.bytes_inter,
        "compression_ratio": comm.stats.bytes_dense / comm.stats.bytes_sent
        if comm.stats.bytes_sent else None,  # None: one process sends nothing
        "weight_density": prunable_density(model),
        "skipped_steps": progress.get("skipped_steps", 0) + guard.skipped,
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




def _config_error(err: ConfigError, env: distenv.DistEnv | None) -> None:
    """The one line, once per node: every rank reads the same config and world, so the
    node's other ranks would repeat it (another node may differ, in its files)."""
    if env is None or env.local_rank == 0:
        print(f"launch.train: error: {err}", file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    env = None
    try:
        env = distenv.detect()
        logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING,
                            format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        cfg, resume_from = resolve_config(args)
    except ConfigError as err:
        _config_error(err, env)
        return 2
    device = distenv.init(env)
    try:
        summary = run(cfg, env, resume_from, device)
        distenv.quiesce()
    except ConfigError as err:  # e.g. a sparsity layer pattern that matches no parameter
        _config_error(err, env)
        return 2
    except Diverged as err:
        if env.is_main:
            saved = checkpoint.root(cfg.out_dir)
            before = (f"the last checkpoint under {saved} is from before it"
                      if any(saved.glob("step-*")) else "no checkpoint was written before it")
            print(f"launch.train: error: {err}; stopped (train.on_nonfinite: stop), {before}",
                  file=sys.stderr)
        return 3
    finally:
        dist.destroy_process_group()
    if env.is_main:
        print(json.dumps({k: summary[k] for k in ("test_accuracy", "steps", "wall_time_s",
                                                   "comm_bytes_sent", "weight_density")}))
    return 0


if __name__ == "__main__":
    distenv.exit_process(main())
