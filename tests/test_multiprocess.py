"""Multi-process training on one machine, the stand-in for multi-host: 2 processes x 4 simulated
CPU devices (``jax.distributed`` with a localhost coordinator, gloo collectives) against 1 process
x 8 devices; checkpoints written by both processes, a kill and a restart, and a preemption
signal to one process that stops both at the same step."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

STEPS = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def write_config(root, dataset, **changes):
    config = {
        "model": {"preset": "tiny", "vocab_size": 320},
        "optimizer": {"lr": 3e-3, "warmup_steps": 5},
        "data": {"dataset": str(dataset), "sources": {"clean": 0.8, "toxic": 0.2}, "seq_len": 32, "batch_size": 16},
        "mesh": {"data": 4, "fsdp": 2},
        "checkpoint": {"every": 10, "async_save": False},
        "steps": STEPS,
        "log_every": 1,
        "tensorboard": False,
        **changes,
    }
    path = root / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def launch(config, run_dir, processes, *extra):
    """``jaxlm train`` in ``processes`` processes of 8 / processes CPU devices each."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // processes}",
           "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "jaxlm", "train", str(config), "--run-dir", str(run_dir), "--no-progress", *extra]
    if processes == 1:
        return [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    port = free_port()
    return [subprocess.Popen(command + ["distributed=true", f"coordinator_address=localhost:{port}",
                                        f"num_processes={processes}", f"process_id={i}"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(processes)]


def wait(procs, timeout=300):
    outputs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        outputs.append(out)
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def logged_step(run_dir) -> int:
    """The newest step in ``metrics.jsonl`` (process 0 writes a row every step), 0 before any."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except json.JSONDecodeError:  # a row being written
            continue
    return 0


def wait_for_step(run_dir, procs, step, timeout=240):
    deadline = time.monotonic() + timeout
    while logged_step(run_dir) < step:
        for p in procs:
            assert p.poll() is None, f"a process ended before step {step}: {p.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, f"no step {step} after {timeout} s"
        time.sleep(0.01)
    return logged_step(run_dir)


def checkpoint_steps(run_dir):
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def assert_same_losses(run, single):
    one, two = losses(single), losses(run)
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def single(tiny_prepared, tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    wait(launch(write_config(root, tiny_prepared), root / "run", 1))
    return root / "run"


def test_two_processes_train_like_one(single, tiny_prepared, tmp_path):
    run = tmp_path / "run"
    outputs = wait(launch(write_config(tmp_path, tiny_prepared), run, 2))
    assert_same_losses(run, single)
    assert checkpoint_steps(run) == [10, 20]
    assert all(f"stopped at step {STEPS} (completed)" in out for out in outputs)


def test_kill_one_process_then_restart_both_resumes_exactly(single, tiny_prepared, tmp_path):
    """SIGKILL one process after the step-10 checkpoint (the other, left waiting in a collective,
    is then killed too, as a scheduler would); both restarted resume at 10 and end as one run."""
    run, config = tmp_path / "run", write_config(tmp_path, tiny_prepared)
    procs = launch(config, run, 2)
    wait_for_step(run, procs, 11)
    procs[1].kill()
    procs[1].wait()
    time.sleep(0.5)
    procs[0].kill()
    procs[0].wait()
    killed_at = logged_step(run)
    assert killed_at < STEPS, "the run finished before the kill"
    assert checkpoint_steps(run) == [10]
    outputs = wait(launch(config, run, 2))
    assert all(f"stopped at step {STEPS} (completed)" in out for out in outputs)
    assert_same_losses(run, single)


def test_preemption_signal_to_one_process_stops_every_process_at_one_step(single, tiny_prepared, tmp_path):
    """SIGTERM to process 1 only: both processes save the same step and exit cleanly; restarted,
    the run ends equal to an uninterrupted one."""
    run, config = tmp_path / "run", write_config(tmp_path, tiny_prepared)
    procs = launch(config, run, 2)
    wait_for_step(run, procs, 3)
    # Pause the process while signalling it, so that the run cannot reach its end first.
    procs[1].send_signal(signal.SIGSTOP)
    procs[1].send_signal(signal.SIGTERM)
    procs[1].send_signal(signal.SIGCONT)
    outputs = wait(procs)
    stops = [re.search(r"stopped at step (\d+) \((\w+)\)", out) for out in outputs]
    assert all(stops), outputs
    (step0, how0), (step1, how1) = (m.groups() for m in stops)
    assert how0 == how1 == "SIGTERM"
    assert step0 == step1 and 3 <= int(step0) < STEPS
    assert int(step0) in checkpoint_steps(run)
    assert logged_step(run) == int(step0)
    outputs = wait(launch(config, run, 2))
    assert all(f"stopped at step {STEPS} (completed)" in out for out in outputs)
    assert_same_losses(run, single)
