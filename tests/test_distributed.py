"""Tests of aejax.runtime.distributed and of a run over two processes on 127.0.0.1 (one CPU device each).

Each process is a subprocess (tests/distributed_check.py) with a hard timeout: a JAX process
whose peer is gone can block in a collective or abort, and must not take pytest with it.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from aejax.runtime import checkpoints, distributed, trainer
from aejax.runtime import config as config_lib
from distributed_check import EPOCHS, dist_config
from placement_check import loop_splits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tests", "distributed_check.py")
STEPS = EPOCHS * 4
TIMEOUT = 180  # seconds for one 2-process run, start-up and compiling included, on a busy machine
KILL_AFTER_STEP = 6

# The 2-process step sums the gradients of two 32-example halves with an all-reduce where the
# 1-process step sums 64 examples at once: float32 sums in another order, carried through 16
# Adam steps at lr 1e-2 (measured over 24 such steps: at most 1.5e-7). A wrong split of the batch or a missing
# reduction moves parameters by 1e-2 or more.
RTOL, ATOL = 1e-5, 1e-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workdir, *, step_delay: float = 0.0, stream: bool = False) -> list[subprocess.Popen]:
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=1")
    extra = (["--step-delay", str(step_delay)] if step_delay else []) + (["--stream"] if stream else [])
    return [subprocess.Popen([sys.executable, SCRIPT, str(workdir), str(port), "2", str(i), *extra],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for i in range(2)]


def finish(procs, timeout=TIMEOUT) -> list[dict]:
    out = []
    deadline = time.time() + timeout
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a 2-process run did not end within {timeout} s")
        out.append({"rc": p.returncode, "stdout": stdout, "stderr": stderr})
    return out


def signal_once_checkpointed(runs: dict) -> dict:
    """``runs``: name -> (procs, workdir, signal). Sends each run's signal to its process 1 once
    a checkpoint of step >= KILL_AFTER_STEP exists in its workdir; returns name -> (that
    checkpoint's step or None if the run ended first, the time the signal was sent)."""
    out = {name: (None, None) for name in runs}
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        waiting = [n for n in runs if out[n][1] is None and runs[n][0][0].poll() is None]
        if not waiting:
            break
        for name in waiting:
            procs, workdir, sig = runs[name]
            ckdir = workdir / "checkpoints"
            done = [int(s) for s in os.listdir(ckdir) if s.isdigit()] if ckdir.exists() else []
            if done and max(done) >= KILL_AFTER_STEP:
                procs[1].send_signal(sig)
                out[name] = (max(done), time.time())
            elif done:
                out[name] = (max(done), None)
        time.sleep(0.05)
    return out


def read(workdir, step=None):
    ckpts = checkpoints.Checkpoints(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        steps = ckpts.steps()
        tree, meta = ckpts.read(step)
    finally:
        ckpts.close()
    return steps, tree, meta


def leaves_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process; two processes; two processes of which one is killed and, side by side, two of
    which one is sent SIGTERM; their restarts.

    The uninterrupted 2-process run streams its batches from host memory (each process places
    its half of every batch); the killed one and its restart keep the training set on the
    devices. The same batches in the same order: the two paths must end bit for bit alike.
    """
    root = tmp_path_factory.mktemp("distributed")
    out = {"root": root}
    # Start the first 2-process run now; the 1-process run below overlaps with its start-up.
    full = launch(root / "two", stream=True)
    trainer.train_and_evaluate(dist_config(parallel="none"), str(root / "one"), splits=loop_splits())
    out["two"] = finish(full)

    # A process killed (SIGKILL) and, side by side, a process sent SIGTERM (a preemption notice
    # reaching one host: both processes agree on the stop at the same step boundary, save that
    # step and exit); then both runs restart side by side and resume.
    killed = launch(root / "killed", step_delay=0.3)
    termed = launch(root / "termed", step_delay=0.3)
    sent = signal_once_checkpointed({"killed": (killed, root / "killed", signal.SIGKILL),
                                     "termed": (termed, root / "termed", signal.SIGTERM)})
    out["killed_checkpoint"], killed_at = sent["killed"]
    out["killed"] = finish(killed, timeout=60)
    out["survivor_seconds"] = time.time() - (killed_at or time.time())
    out["termed"] = finish(termed, timeout=90)
    out["after_kill"] = read(root / "killed")
    out["after_term"] = read(root / "termed")

    restarted, term_restarted = launch(root / "killed"), launch(root / "termed")
    out["restarted"] = finish(restarted)
    out["term_restarted"] = finish(term_restarted)
    return out


def test_two_processes_end_with_the_parameters_of_one(runs):
    for proc in runs["two"]:
        assert proc["rc"] == 0, proc["stderr"][-3000:]
        assert json.loads(proc["stdout"].strip().splitlines()[-1])["steps"] == STEPS
    steps, two, meta = read(runs["root"] / "two")
    _, one, _ = read(runs["root"] / "one")
    assert meta["parallel"] == "sharded" and meta["num_devices"] == 2 and meta["num_processes"] == 2
    moved = max(float(np.max(np.abs(a))) for a in jax.tree.leaves(one["state"]["params"]))
    assert moved > 1e3 * ATOL
    for a, b in zip(jax.tree.leaves(two["state"]["params"]), jax.tree.leaves(one["state"]["params"])):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
    # Each process evaluated its half of the test split; the reduced metrics are the whole split's.
    test_two = json.loads(runs["two"][1]["stdout"].strip().splitlines()[-1])["test"]
    test_one = json.loads((runs["root"] / "one" / "summary.json").read_text())["test"]
    for k in test_one:
        np.testing.assert_allclose(test_two[k], test_one[k], rtol=RTOL, atol=ATOL)


def test_only_process_0_logs_and_writes(runs):
    p0, p1 = runs["two"]
    assert "[aejax]" in p0["stderr"] and "[aejax]" not in p1["stderr"]
    lines = [json.loads(l) for l in (runs["root"] / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines if l["split"] == "validation"] == list(range(1, EPOCHS + 1))
    assert json.loads((runs["root"] / "two" / "summary.json").read_text())["steps"] == STEPS


def test_a_dead_peer_stops_the_survivor_with_a_clear_error(runs):
    assert runs["killed_checkpoint"] is not None, "the run ended before a process could be killed"
    survivor, killed = runs["killed"]
    assert killed["rc"] == -signal.SIGKILL
    assert survivor["rc"] != 0
    # The survivor's next collective fails at once; heartbeat_timeout (5 s) bounds the rest.
    assert runs["survivor_seconds"] < 30
    if survivor["rc"] == 3:  # the usual way: the lost peer reported by aejax
        assert "lost contact with the other processes" in survivor["stderr"]
        assert "start all processes again" in survivor["stderr"]
    else:  # blocked in a checkpoint barrier instead: jax.distributed aborts it (SIGABRT)
        assert survivor["rc"] in (-signal.SIGABRT, 134), survivor["stderr"][-3000:]


def test_after_a_dead_peer_the_last_checkpoint_restores_and_a_restart_resumes(runs):
    steps, tree, meta = runs["after_kill"]
    assert KILL_AFTER_STEP <= steps[-1] < STEPS and not meta["finished"]
    # The newest checkpoint left behind is the uninterrupted run's at that step, bit for bit.
    _, same_step, _ = read(runs["root"] / "two", steps[-1])
    assert leaves_equal(tree["state"], same_step["state"])
    for proc in runs["restarted"]:
        assert proc["rc"] == 0, proc["stderr"][-3000:]
    assert f"Resumed from step {steps[-1]}" in runs["restarted"][0]["stderr"]
    assert "Streaming" in runs["two"][0]["stderr"] and "Streaming" not in runs["restarted"][0]["stderr"]
    _, resumed, _ = read(runs["root"] / "killed")
    _, full, _ = read(runs["root"] / "two")
    assert leaves_equal(resumed["state"], full["state"])


def test_sigterm_to_one_process_stops_both_at_one_step_and_a_restart_resumes_bitwise(runs):
    stopped = [json.loads(p["stdout"].strip().splitlines()[-1]) for p in runs["termed"]]
    for proc in runs["termed"]:
        assert proc["rc"] == 128 + signal.SIGTERM, proc["stderr"][-3000:]
        assert "Stopped by SIGTERM" in proc["stderr"]
    # The same step on both, and it is the newest checkpoint, not yet the end of the run.
    assert stopped[0]["preempted_at"] == stopped[1]["preempted_at"]
    steps, tree, meta = runs["after_term"]
    assert steps[-1] == stopped[0]["preempted_at"] < STEPS and not meta["finished"]
    _, same_step, _ = read(runs["root"] / "two", steps[-1])
    assert leaves_equal(tree["state"], same_step["state"])
    for proc in runs["term_restarted"]:
        assert proc["rc"] == 0, proc["stderr"][-3000:]
    assert f"Resumed from step {steps[-1]}" in runs["term_restarted"][0]["stderr"]
    _, resumed, _ = read(runs["root"] / "termed")
    _, full, _ = read(runs["root"] / "two")
    assert leaves_equal(resumed["state"], full["state"])


# --------------------------------------------------------------------------- in this process


def test_even_split_covers_every_row_once():
    for n, parts in ((10, 3), (64, 2), (5, 8), (0, 2)):
        slices = [distributed.even_split(n, parts, i) for i in range(parts)]
        rows = np.concatenate([np.arange(n)[s] for s in slices])
        np.testing.assert_array_equal(rows, np.arange(n))
        sizes = [s.stop - s.start for s in slices]
        assert max(sizes) - min(sizes) <= 1


def test_process_rows_single_process_is_the_whole_batch():
    assert distributed.process_rows(64) == slice(0, 64)


@pytest.mark.parametrize("settings,match", [
    ({"num_processes": 2}, "needs distributed.coordinator_address"),
    ({"coordinator_address": "127.0.0.1", "num_processes": 2}, "host:port"),
    ({"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 2}, r"\[0, 2\)"),
    ({"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1},
     "must start before JAX uses any device"),
])
def test_bad_distributed_settings_are_clear_errors(settings, match):
    c = dist_config()
    c.distributed.update(settings)
    with pytest.raises(config_lib.ConfigError, match=match):
        config_lib.start_distributed(c)
