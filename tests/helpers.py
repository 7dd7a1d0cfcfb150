"""Small helpers the tests share (pytest puts this folder on sys.path)."""
import os
import subprocess
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, stdin=None, torchrun=False, timeout=600, port=29533):
    """Run a repository script as a user would (one thread, from the repository root); torchrun: 2 processes
    (tests that launch torchrun use distinct ports, so that two test files may run at once)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
           if torchrun else [sys.executable]) + args
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, input=stdin)


def ranks_failure(r, chars=3000):
    """What a failed torchrun says: each rank's first error line (the one that failed first is seldom the last
    to speak) and the tail of its stderr."""
    first, aborts = {}, []
    for line in r.stderr.splitlines():
        if line.startswith("[rank") and "Error" in line:
            first.setdefault(line.split("]")[0], line)
        elif "terminate called" in line or "what():" in line:  # a C++ abort (SIGABRT) names no rank
            aborts.append(line)
    return "\n".join([*first.values(), *aborts[:4]]) + "\n...\n" + r.stderr[-chars:]


def assert_rigid(w2c, atol=1e-5):
    R = w2c[..., :3, :3]
    eye = torch.eye(3).expand_as(R)
    assert torch.allclose(R.mT @ R, eye, atol=atol)
    assert torch.allclose(torch.linalg.det(R), torch.ones(R.shape[:-2]), atol=atol)
    assert torch.equal(w2c[..., 3, :], torch.tensor([0.0, 0, 0, 1]).expand_as(w2c[..., 3, :]))


def pose(R, t):
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, t
    return T


R_Y90 = np.array([[0.0, 0, 1], [0, 1, 0], [-1, 0, 0]])  # yaw right by 90°: +z turns to +x
