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


@pytest.mark.parametrize("ranks,layout", [(2, "contiguous"), (3, "zigzag")])
def test_row_sharded_bias_mask_weights_dropout_and_parameter_gradients(files, ranks, layout):
    rng = np.random.default_rng(4)
    np.save(files / "bias.npy", rng.standard_normal((4, 23, 23), dtype=np.float32))  # [H, Nq, Nk]
    mask = rng.random((2, 1, 23, 23)) < 0.8
    mask[1, 0, 5] = False  # a row that sees nothing
    np.save(files / "mask.npy", mask)
    np.save(files / "w.npy", rng.standard_normal((8, 8), dtype=np.float32) * 0.3)
    inputs = ["attention", "--q", "q.npy", "--k", "k.npy", "--v", "v.npy", "--score", "bilinear",
              "--w", "w.npy", "--bias", "bias.npy", "--mask", "mask.npy", "--dropout", "0.2",
              "--dropout-seed", "5"]
    names = OUTPUTS + ("weights", "dw")

    def extra(suffix):
        return ["--weights", f"weights{suffix}.npy", "--dw", f"dw{suffix}.npy"]

    single = run(inputs + outputs("1") + extra("1"), files)
    assert single.returncode == 0, single.stderr
    job = run(inputs + outputs("P") + extra("P") + ["--distributed", "auto", "--layout", layout,
                                                    "--weights-png", "weightsP.svg"], files, ranks)
    assert job.returncode == 0, job.stderr
    assert (files / "weightsP.svg").read_text().count("head ") == 4  # batch 0, a panel per head
    for name in names:
        one, many = np.load(files / f"{name}1.npy"), np.load(files / f"{name}P.npy")
        assert one.shape == many.shape, name
        finite = np.isfinite(one)
        assert (finite == np.isfinite(many)).all(), name
        assert np.abs(one[finite] - many[finite]).max() <= 2e-5 * (1 + np.abs(one[finite]).max()), name
    assert (np.load(files / "weightsP.npy") == 0).mean() > 0.2  # the mask and dropout are there


def test_heads_refuses_a_row_sharded_bias(files):
    np.save(files / "bias.npy", np.zeros((23, 23), dtype=np.float32))
    job = run(["attention", "--q", "q.npy", "--k", "k.npy", "--v", "v.npy", "--out", "o.npy",
               "--bias", "bias.npy", "--distributed", "heads"], files, 2)
    assert job.returncode == 2
    assert "strategy: heads expected no bias" in job.stderr
    assert not (files / "o.npy").exists()


def test_a_bad_file_fails_the_job_without_output(files):
    with open(files / "k.npy", "r+b") as f:  # truncate the data: the header promises more
        f.truncate(os.path.getsize(files / "k.npy") - 40)
    job = run(["attention", "--q", "q.npy", "--k", "k.npy", "--v", "v.npy", "--out", "o.npy",
               "--distributed", "ring"], files, 3)
    assert job.returncode != 0
    assert "k.npy" in job.stderr and "truncated" in job.stderr
    assert not (files / "o.npy").exists()
    assert [p.name for p in files.iterdir() if p.name.startswith(".tmp")] == []


def test_bench_reports_time_per_rank_overlap_and_the_model(tmp_path):
    """The figures a closing note quotes are all printed (timings themselves are not tested)."""
    job = run(["bench", "--distributed", "--shapes", "B1H2N256D16causal", "--repetitions", "1",
               "--link-gbs", "2.5", "--latency-us", "4"], tmp_path, 2)
    assert job.returncode == 0, job.stderr
    lines = job.stdout.splitlines()
    assert "ring attention, 2 ranks, B1H2N256D16causal (zigzag layout)" in lines[0]
    forward = lines.index(next(l for l in lines if l.split()[:2] == ["rank", "wall"]))
    for rank in (0, 1):  # wall, compute, waiting, transfers, hidden %, MiB sent
        row = lines[forward + 1 + rank].split()
        wall, compute, waiting, hidden = float(row[1]), float(row[2]), float(row[3]), row[5]
        assert row[0] == str(rank) and 0 < compute <= wall and waiting <= wall  # parts of the wall
        assert hidden.endswith("%") and 0 <= float(hidden[:-1]) <= 100
    assert any(l.startswith("ring backward") for l in lines)
    model = next(l for l in lines if l.startswith("model:"))
    assert "link W = 2.5 GB/s (--link-gbs)" in model and "latency 4.0 µs" in model
    ranks = [int(l.split()[0]) for l in lines if l.split() and l.split()[0].isdigit() and
             l.split()[-1].endswith("%") and "×" in l]
    assert ranks == [8, 16, 32, 64, 128, 256, 512, 1024]
