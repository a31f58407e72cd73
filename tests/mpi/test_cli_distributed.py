"""`mpirun -np P qkv attention --distributed …` writes what one process writes, and a bad input
file makes the whole job fail with the reason and no output file."""
import os
import subprocess

import numpy as np
import pytest

QKV = os.environ.get("QKV_BIN", "qkv")
MPIRUN = ["mpirun", "--oversubscribe", "--allow-run-as-root"]


def run(args, cwd, ranks=None):
    command = [QKV, *map(str, args)] if ranks is None else [*MPIRUN, "-np", str(ranks), QKV, *map(str, args)]
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, env=environment)


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(3)
    np.save(tmp_path / "q.npy", rng.standard_normal((2, 23, 4, 8), dtype=np.float32))
    np.save(tmp_path / "k.npy", rng.standard_normal((2, 23, 2, 8), dtype=np.float32))
    np.save(tmp_path / "v.npy", rng.standard_normal((2, 23, 2, 6), dtype=np.float32))
    np.save(tmp_path / "do.npy", rng.standard_normal((2, 23, 4, 6), dtype=np.float32))
    return tmp_path


OUTPUTS = ("o", "lse", "dq", "dk", "dv")


def outputs(suffix):
    return ["--out", f"o{suffix}.npy", "--lse", f"lse{suffix}.npy", "--dout", "do.npy",
            "--dq", f"dq{suffix}.npy", "--dk", f"dk{suffix}.npy", "--dv", f"dv{suffix}.npy"]


@pytest.mark.parametrize("ranks,strategy,layout", [(2, "ring", "contiguous"), (3, "ring", "zigzag"),
                                                   (4, "ring", "zigzag"), (2, "heads", "contiguous")])
def test_equals_one_process(files, ranks, strategy, layout):
    inputs = ["attention", "--q", "q.npy", "--k", "k.npy", "--v", "v.npy", "--causal",
              "--score", "scaled_dot"]
    single = run(inputs + outputs("1"), files)
    assert single.returncode == 0, single.stderr
    job = run(inputs + outputs("P") + ["--distributed", strategy, "--layout", layout], files, ranks)
    assert job.returncode == 0, job.stderr
    for name in OUTPUTS:
        one, many = np.load(files / f"{name}1.npy"), np.load(files / f"{name}P.npy")
        assert one.shape == many.shape
        assert np.abs(one - many).max() <= 2e-5 * (1 + np.abs(one).max()), name


def test_a_bad_file_fails_the_job_without_output(files):
    with open(files / "k.npy", "r+b") as f:  # truncate the data: the header promises more
        f.truncate(os.path.getsize(files / "k.npy") - 40)
    job = run(["attention", "--q", "q.npy", "--k", "k.npy", "--v", "v.npy", "--out", "o.npy",
               "--distributed", "ring"], files, 3)
    assert job.returncode != 0
    assert "k.npy" in job.stderr and "truncated" in job.stderr
    assert not (files / "o.npy").exists()
    assert [p.name for p in files.iterdir() if p.name.startswith(".tmp")] == []
