"""Long jobs that survive: torchrun restarts, a changed world size, divergence, a wandb
outage and damaged checkpoints; per-rank checkpoint shards that rank 0 never gathers."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from dgc import reshard
from launch import checkpoint
from tests.distributed import run_ranks
from tests.launch_helpers import REPO, launch_env, read_run, train
from tests.wandb_offline import read_offline_run

SYNTHETIC = ["data.name=synthetic", "data.synthetic_train_size=512",
             "data.synthetic_test_size=128", "train.batch_size=32", "wandb.mode=disabled",
             "train.log_every=4"]
DGC = REPO / "configs/mnist_lenet300_dgc.yaml"


def final_params(out):
    common, _ = checkpoint.read(out)
    return common["model"], common["progress"]["step"]


def assert_same_params(a, b):
    for name, tensor in a.items():
        assert torch.equal(b[name], tensor), name


COMMON = [*SYNTHETIC, "train.epochs=3", "dgc.warmup_epochs=1"]  # 8 steps an epoch at 2 ranks


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The final parameters and step of a 2-rank DGC run of ``COMMON``, never stopped: what
    the interrupted runs below must end at."""
    out = tmp_path_factory.mktemp("uninterrupted")
    train(DGC, *COMMON, f"out_dir={out}", nproc=2)
    return final_params(out)


# -- torchrun --max-restarts -------------------------------------------------------------------

def _workers(agent_pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(agent_pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_a_killed_worker_is_restarted_by_torchrun_and_the_run_ends_as_if_uninterrupted(
        tmp_path, uninterrupted):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "--max-restarts=1", "-m", "launch.train", "--config", str(DGC)]
    for o in COMMON + ["train.checkpoint_every=3", f"out_dir={tmp_path / 'killed'}"]:
        cmd += ["--set", o]
    agent = subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while not latest.exists() and agent.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed = _workers(agent.pid)
    assert killed and agent.poll() is None, "the run ended before its first checkpoint"
    os.kill(killed[-1], signal.SIGKILL)
    _, err = agent.communicate(timeout=300)
    assert agent.returncode == 0, err[-3000:]
    # the worker died by the signal, torchrun restarted the group, the new attempt resumed
    assert "exitcode: -9" in err and "resumed" in err, err[-3000:]
    a, steps_a = uninterrupted
    b, steps_b = final_params(tmp_path / "killed")
    assert steps_a == steps_b == 24
    assert_same_params(a, b)
    # the run directory and name stayed the same; metrics hold each step once
    _, metrics = read_run(tmp_path / "killed")
    logged = [m["train/step"] for m in metrics if "train/loss" in m]
    assert logged == sorted(set(logged)) and logged[-1] == 24


# -- a changed world size ---------------------------------------------------------------------

@pytest.mark.parametrize("old,new", [
    ((2, None), (3, None)), ((2, None), (1, None)), ((4, None), (4, 2)), ((4, 2), (3, None)),
    ((4, 2), (2, 2))])
def test_resharding_keeps_the_pending_update(old, new):
    """sum over new units of v' / q == sum over old units of v / p, flat or hierarchical
    (ranks per node), for the residual and a local momentum; a global momentum stays."""
    (p, rpn_old), (q, rpn_new) = old, new
    numel = 103
    g = torch.Generator().manual_seed(0)
    states = []
    for r in range(p):
        pieces = {}
        if rpn_old:  # each local rank holds its piece of both tensors
            for name, n in (("w", numel), ("bias", 7)):
                b = [j * n // rpn_old for j in range(rpn_old + 1)]
                j = r % rpn_old
                pieces[name] = (b[j], b[j + 1] - b[j])
        size = pieces["w"][1] if pieces else numel
        bias = torch.ones(pieces["bias"][1] if pieces else 7)
        states.append({"momentum": {"w": torch.randn(size, generator=g), "bias": bias},
                       "accumulation": {"w": torch.randn(size, generator=g)},
                       "pieces": pieces,
                       "global_momentum": ["bias"], "stats": {}, "epoch": 1.0, "step": 5,
                       "selections": {}, "thresholds": {}, "weight_decay_momentum": {}})
    numels = {"w": numel, "bias": 7}
    totals = {}
    for s in states:
        reshard.add_placed(totals, s, numels)
    units_old = p // rpn_old if rpn_old else p
    new_states = [reshard.new_state(totals, states[0], old_world=p, old_units=units_old,
                                    new_rank=r, new_ranks_per_node=rpn_new) for r in range(q)]
    before = totals["w"][1] / p
    after_totals = {}
    for s in new_states:
        reshard.add_placed(after_totals, s, numels)
    torch.testing.assert_close(after_totals["w"][1] / q, before, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(after_totals["w"][0] / q, totals["w"][0] / p, rtol=1e-6,
                               atol=1e-6)
    units_new = q // rpn_new if rpn_new else q
    torch.testing.assert_close(after_totals["bias"][0] / units_new, torch.ones(7))


@pytest.fixture(scope="module")
def stopped_at_13(tmp_path_factory):
    """A 2-rank run of ``COMMON`` stopped mid-epoch 2, after its checkpoint at step 13."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    train(DGC, *COMMON, f"out_dir={out}", "train.max_steps=13", "train.checkpoint_every=13",
          nproc=2)
    return out


def test_an_fp16_run_stopped_in_its_last_epoch_resumes_to_the_same_bits_and_loss(tmp_path):
    """The GradScaler's state and every rank's partial loss sum come back with the
    checkpoint (the train loss used to be rank 0's partial sum counted twice), and the
    wandb run goes on under its id."""
    amp = [*COMMON, "train.amp=fp16"]
    train(DGC, *amp, f"out_dir={tmp_path / 'straight'}", nproc=2)
    part = tmp_path / "part"
    train(DGC, *amp, f"out_dir={part}", "train.max_steps=20", "train.checkpoint_every=20",
          "wandb.mode=offline", nproc=2)
    train(None, "train.max_steps=null", nproc=2, extra_args=["--resume", str(part)])
    # the resumed attempt continued the first one's wandb run (wandb sync joins them)
    attempts = sorted((part / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and len({a.name.rsplit("-", 1)[1] for a in attempts}) == 1
    (a, steps_a), (b, steps_b) = final_params(tmp_path / "straight"), final_params(part)
    assert steps_a == steps_b
    assert_same_params(a, b)
    straight, _ = read_run(tmp_path / "straight")
    resumed, _ = read_run(part)
    assert resumed["train_loss"] == straight["train_loss"]
    assert checkpoint.read(part)[0]["progress"]["grad_scaler"]["scale"] == 2.0 ** 16


def test_a_row_cut_short_by_a_crash_does_not_stop_the_resume(tmp_path, stopped_at_13):
    part = tmp_path / "part"
    shutil.copytree(stopped_at_13, part)
    with open(part / "metrics.jsonl", "a") as f:
        f.write('{"train/step": 14, "train/lo')  # the attempt died mid-append
    train(None, "train.max_steps=null", nproc=2, extra_args=["--resume", str(part)])
    steps = [m["train/step"] for m in _strict_json_lines(part / "metrics.jsonl")
             if "train/loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == 24


@pytest.mark.parametrize("text, message", [("", "holds no config"),
                                           ("model: [unclosed\n", "is not valid YAML")])
def test_a_damaged_config_yaml_is_one_line_on_resume(tmp_path, stopped_at_13, text, message):
    part = tmp_path / "part"
    shutil.copytree(stopped_at_13, part)
    (part / "config.yaml").write_text(text)
    proc = train(None, check=False, timeout=120, extra_args=["--resume", str(part)])
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]


@pytest.mark.parametrize("nproc", [3, 1])
def test_a_two_rank_checkpoint_continues_on_another_world_size(tmp_path, stopped_at_13, nproc):
    part = tmp_path / "part"
    shutil.copytree(stopped_at_13, part)
    train(None, "train.max_steps=null", nproc=nproc, extra_args=["--resume", str(part)])
    summary, metrics = read_run(part)
    assert summary["world_size"] == nproc
    assert math.isfinite(summary["test_accuracy"])
    # the evaluation where the first attempt stopped mid-epoch counts a fraction of it
    done = [m["epoch/index"] for m in metrics if "epoch/index" in m]
    assert done == sorted(set(done)) and done[-1] == 3 and any(d % 1 for d in done), done
    common, shards = checkpoint.read(part)
    assert common["progress"]["epoch"] == 3 and len(shards) == nproc


def test_max_steps_on_an_epochs_last_step_finishes_that_epoch(tmp_path):
    # one process, 512 samples in batches of 32: 16 steps an epoch
    run = tmp_path / "run"
    train(REPO / "configs/mnist_lenet300_dense.yaml", *SYNTHETIC, "train.epochs=2",
          "train.max_steps=16", f"out_dir={run}")
    assert checkpoint.read(run)[0]["progress"]["epoch"] == 1
    train(None, "train.max_steps=null", extra_args=["--resume", str(run)])
    _, metrics = read_run(run)
    assert [m["epoch/index"] for m in metrics if "epoch/index" in m] == [1, 2]


# -- divergence ------------------------------------------------------------------------------

def _strict_json_lines(path):
    def refuse(constant):
        raise ValueError(f"non-strict JSON constant {constant}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_a_diverging_run_stops_with_exit_3_and_keeps_its_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = train(REPO / "configs/quickstart.yaml", *SYNTHETIC, "train.lr=1000",
                 "train.checkpoint_every=1", "train.log_every=1", f"out_dir={out}",
                 check=False, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if "error" in ln]
    assert len(lines) == 1 and "non-finite loss or gradient at step" in lines[0], proc.stderr
    assert "the last checkpoint under" in lines[0]
    common, _ = checkpoint.read(out)
    assert all(torch.isfinite(t).all() for t in common["model"].values())
    _strict_json_lines(out / "metrics.jsonl")


def test_a_run_diverging_before_its_first_checkpoint_says_there_is_none(tmp_path):
    proc = train(REPO / "configs/quickstart.yaml", *SYNTHETIC, "train.lr=1000",
                 "train.log_every=1", f"out_dir={tmp_path / 'run'}", check=False, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "no checkpoint was written before it" in proc.stderr


def test_skip_mode_skips_non_finite_steps_on_every_rank_and_counts_them(tmp_path):
    out = tmp_path / "run"
    train(REPO / "configs/quickstart.yaml", *SYNTHETIC, "train.lr=1000", "train.epochs=2",
          "train.on_nonfinite=skip", f"out_dir={out}", nproc=2)
    summary = json.loads((out / "summary.json").read_text(),
                         parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert summary["skipped_steps"] > 0
    assert summary["steps"] + summary["skipped_steps"] == 16
    common, _ = checkpoint.read(out)
    assert all(torch.isfinite(t).all() for t in common["model"].values())
    _strict_json_lines(out / "metrics.jsonl")


def test_skipped_steps_do_not_count_in_the_train_loss(tmp_path):
    """train_loss is the mean loss of the steps taken; the skipped ones add no loss and
    used to count in the denominator."""
    out = tmp_path / "run"
    train(REPO / "configs/quickstart.yaml", *SYNTHETIC, "train.lr=1000", "train.epochs=1",
          "train.on_nonfinite=skip", "train.log_every=1", f"out_dir={out}")
    summary, metrics = read_run(out)
    assert summary["skipped_steps"] > 0
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]  # every step taken
    assert len(losses) == summary["steps"]
    assert summary["train_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)


# -- wandb outage ---------------------------------------------------------------------------

def _timed_run(out, env):
    cmd = [sys.executable, "-m", "launch.train", "--config", str(REPO / "configs/quickstart.yaml")]
    for o in [*SYNTHETIC[:-2], "train.epochs=1", "train.log_every=2", f"out_dir={out}",
              "wandb.mode=" + ("online" if "WANDB_API_KEY" in env else "offline")]:
        cmd += ["--set", o]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return time.monotonic() - started, proc


def test_credentials_without_a_network_record_the_run_offline_within_seconds(tmp_path):
    offline_env = launch_env()
    offline_s, _ = _timed_run(tmp_path / "offline", offline_env)
    online_env = dict(launch_env(), WANDB_API_KEY="f" * 40,
                      WANDB_BASE_URL="http://10.255.255.1:81")  # routes nowhere
    online_env.pop("WANDB_MODE")
    outage_s, proc = _timed_run(tmp_path / "outage", online_env)
    assert outage_s - offline_s < 15, (outage_s, offline_s)
    assert "offline" in proc.stderr
    recorded = read_offline_run(tmp_path / "outage" / "wandb")
    _, metrics = read_run(tmp_path / "outage")
    steps = [m["train/step"] for m in metrics if "train/loss" in m]
    assert steps and [r["train/step"] for r in recorded["history"] if "train/loss" in r] == steps


# -- damaged checkpoints ------------------------------------------------------------------------

def test_a_truncated_checkpoint_is_skipped_for_the_previous_one(tmp_path, uninterrupted):
    part = tmp_path / "part"
    train(DGC, *COMMON, f"out_dir={part}", "train.max_steps=15", "train.checkpoint_every=5",
          nproc=2)
    newest = checkpoint.latest(part)  # no process group: this process alone checks
    shard = newest / checkpoint.shard_name(1)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    proc = train(None, "train.max_steps=null", nproc=2, extra_args=["--resume", str(part)])
    assert "incomplete or damaged" in proc.stderr
    assert "step-00000010" in proc.stderr  # resumed from the one before
    b, _ = final_params(part)
    assert_same_params(uninterrupted[0], b)


# -- rank 0 gathers no other rank's state ------------------------------------------------------

def _save_rank(rank, world_size, out_dir):
    import torch.distributed as dist
    gathered = []
    real = dist.all_gather_object

    def counting(object_list, obj, *args, **kwargs):
        real(object_list, obj, *args, **kwargs)
        gathered.append(sum(len(json.dumps(o)) for o in object_list))
    dist.all_gather_object = counting
    try:
        own = {"comm": {"accumulation": {"w": torch.full((1 << 20,), float(rank))}}}
        common = {"model": {"w": torch.zeros(4)}, "progress": {"step": 7}} if rank == 0 else None
        checkpoint.save(out_dir, 7, own, common, {"comm": "dgc"})
    finally:
        dist.all_gather_object = real
    return gathered


def test_a_save_at_4_ranks_sends_rank_0_names_and_hashes_not_state(tmp_path):
    results = run_ranks(_save_rank, 4, str(tmp_path))
    assert max(sum(r) for r in results) < 4096  # each shard is 4 MiB
    _, shards = checkpoint.read(tmp_path)
    assert [float(s["comm"]["accumulation"]["w"][0]) for s in shards] == [0.0, 1.0, 2.0, 3.0]


def _dgc_state(seed, exchange="auto"):
    from torch.nn.parallel import DistributedDataParallel as DDP
    import dgc
    from tests.test_dgc_distributed import MLP, _sgd, _train
    import torch.distributed as dist
    model = MLP(wide=True)
    ddp = DDP(model, bucket_cap_mb=0.001)
    opt = _sgd(model, momentum=0.9)
    state = dgc.attach(ddp, opt, density=0.02, warmup_epochs=0, min_numel=100,
                       exchange=exchange)
    return model, ddp, opt, state, _train, dist


def _save_two(rank, world_size, out_dir, exchange):
    model, ddp, opt, state, _train, dist = _dgc_state(0, exchange)
    _train(ddp, opt, 6, rank)
    own = {"comm": state.state_dict(), "rng": checkpoint.rng_state()}
    common = {"model": model.state_dict()} if rank == 0 else None
    checkpoint.save(out_dir, 6, own, common, {"comm": "dgc", "topology": "flat",
                                              "ranks_per_node": world_size})
    return {n: v.tolist() for n, v in state.state_dict()["accumulation"].items()}


def _load_on(rank, world_size, out_dir, exchange):
    from launch import resume
    model, ddp, opt, state, _train, dist = _dgc_state(1, exchange)
    directory = checkpoint.latest(out_dir)
    resume._reshard_comm(directory, checkpoint.read_manifest(directory), state, model,
                         {"comm": "dgc", "topology": "flat", "ranks_per_node": world_size})
    loaded = {n: v.tolist() for n, v in state.state_dict()["accumulation"].items()}
    _train(ddp, opt, 1, rank, start=6)  # and a step runs on the new world
    return loaded


@pytest.mark.parametrize("new_world, exchange", [
    (3, "auto"), (1, "auto"),
    (3, "sparse_allreduce")])  # its regions were cut for 2 ranks
def test_resharded_dgc_residuals_keep_the_pending_update_on_real_ranks(tmp_path, new_world,
                                                                        exchange):
    old = run_ranks(_save_two, 2, str(tmp_path), exchange)
    new = run_ranks(_load_on, new_world, str(tmp_path), exchange)
    for name in old[0]:
        before = sum(torch.tensor(r[name]) for r in old) / 2
        after = sum(torch.tensor(r[name]) for r in new) / new_world
        torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-7)
