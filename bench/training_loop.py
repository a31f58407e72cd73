"""A small model trained the way people train on a CPU, with PyTorch's attention and with qkv's.

    env -u OPENBLAS_CORETYPE PYTHONPATH=build/release/python \\
        /usr/bin/python3 bench/training_loop.py [--steps 20] [--threads 2]

A byte-level causal language model: byte and position embeddings, 4 pre-norm blocks of
`MultiheadAttention(256, 4, batch_first=True)` and an MLP (256 → 1024 → 256, GELU), a final
LayerNorm and a linear head over the 256 bytes; context 256, batch 16, AdamW (lr 3e-4). The text is
the repository's own tracked text files, repeated to 4.5 MB. The same model is built twice from the
same initial weights, once with torch.nn.MultiheadAttention and once with
qkv.nn.MultiheadAttention (the same parameter names: the state dict moves across), and both see
the same batches, so their loss curves must agree step for step (printed: the largest difference).

Timed, interleaved (one PyTorch step, one qkv step, …) so that the machine's drift falls on both:
  - a training step: forward, cross-entropy, backward, AdamW;
  - inference: the forward of one batch in eval mode under torch.no_grad();
  - greedy generation of 200 bytes from a 56-byte prompt, batch 1, the whole context recomputed at
    every step (as a model without a KV cache does).
Each figure is the median over its repetitions; the ratio is PyTorch's time over qkv's (> 1: qkv
is faster). Both sides use `--threads` threads (torch.set_num_threads; qkv's default is every
core: set OMP_NUM_THREADS to match).
"""
import argparse
import math
import os
import subprocess
import time

import numpy as np
import torch
from torch import nn

import qkv.nn

WIDTH, HEADS, BLOCKS, CONTEXT, BATCH = 256, 4, 4, 256, 16


class Block(nn.Module):
    def __init__(self, attention):
        super().__init__()
        self.norm1 = nn.LayerNorm(WIDTH)
        self.attn = attention(WIDTH, HEADS, batch_first=True)
        self.norm2 = nn.LayerNorm(WIDTH)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH))

    def forward(self, x, mask):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ByteModel(nn.Module):
    def __init__(self, attention):
        super().__init__()
        self.bytes = nn.Embedding(256, WIDTH)
        self.positions = nn.Embedding(CONTEXT, WIDTH)
        self.blocks = nn.ModuleList(Block(attention) for _ in range(BLOCKS))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, 256)

    def forward(self, tokens):
        length = tokens.shape[1]
        # True above the diagonal: key j > i hidden (the boolean attn_mask both layers take).
        mask = torch.ones(length, length, dtype=torch.bool).triu(1)
        x = self.bytes(tokens) + self.positions(torch.arange(length))
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))


def repository_text(size):
    files = subprocess.run(["git", "ls-files", "*.md", "*.cpp", "*.hpp", "*.py", "*.txt"],
                           check=True, capture_output=True, text=True).stdout.split()
    text = b"".join(open(name, "rb").read() for name in files)
    return np.frombuffer((text * (size // len(text) + 1))[:size], dtype=np.uint8)


def median(times):
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps per side")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--generate", type=int, default=200, help="bytes generated per side")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = repository_text(4_500_000)
    rng = np.random.default_rng(0)

    torch.manual_seed(0)
    models = {"torch": ByteModel(nn.MultiheadAttention)}
    models["qkv"] = ByteModel(qkv.nn.MultiheadAttention)
    models["qkv"].load_state_dict(models["torch"].state_dict())
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=3e-4)
                  for name, model in models.items()}

    step_times = {name: [] for name in models}
    losses = {name: [] for name in models}
    for step in range(args.steps + 1):  # step 0: warm-up, not timed
        starts = rng.integers(0, len(data) - CONTEXT - 1, BATCH)
        window = np.stack([data[s:s + CONTEXT + 1] for s in starts]).astype(np.int64)
        inputs, targets = torch.from_numpy(window[:, :-1]), torch.from_numpy(window[:, 1:])
        for name, model in models.items():
            model.train()
            start = time.perf_counter()
            logits = model(inputs)
            loss = nn.functional.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1))
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
            if step > 0:
                step_times[name].append(time.perf_counter() - start)
            losses[name].append(loss.item())

    inference_times = {name: [] for name in models}
    for _ in range(10):
        for name, model in models.items():
            model.eval()
            with torch.no_grad():
                start = time.perf_counter()
                model(inputs)
                inference_times[name].append(time.perf_counter() - start)

    prompt = torch.from_numpy(data[:56].astype(np.int64)).unsqueeze(0)
    generated = {name: prompt for name in models}
    token_times = {name: [] for name in models}
    with torch.no_grad():
        for _ in range(args.generate):
            for name, model in models.items():
                context = generated[name][:, -CONTEXT:]
                start = time.perf_counter()
                next_byte = model(context)[:, -1].argmax(-1, keepdim=True)
                token_times[name].append(time.perf_counter() - start)
                generated[name] = torch.cat([generated[name], next_byte], 1)

    difference = max(abs(a - b) for a, b in zip(losses["torch"], losses["qkv"]))
    same_text = torch.equal(generated["torch"], generated["qkv"])
    print(f"byte-level LM: {BLOCKS} blocks of MultiheadAttention({WIDTH}, {HEADS}) + MLP, context "
          f"{CONTEXT}, batch {BATCH}, AdamW; {args.threads} threads, torch {torch.__version__}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}")
    print(f"loss after {args.steps} steps: torch {losses['torch'][-1]:.4f}, "
          f"qkv {losses['qkv'][-1]:.4f} (largest difference over the curve "
          f"{difference:.2e}); generated text identical: {same_text}")
    print(f"{'':<26} {'torch ms':>10} {'qkv ms':>10} {'torch ÷ qkv':>12}")
    for label, times, scale in (("training step", step_times, 1),
                                ("inference (batch)", inference_times, 1),
                                (f"generation ({args.generate} bytes)", token_times,
                                 args.generate)):
        torch_ms, qkv_ms = (1e3 * scale * median(times[name]) for name in ("torch", "qkv"))
        print(f"{label:<26} {torch_ms:>10.1f} {qkv_ms:>10.1f} {torch_ms / qkv_ms:>12.2f}")
    if not math.isfinite(difference) or difference > 1e-3 * max(1.0, abs(losses["torch"][0])):
        raise SystemExit("the two models' losses differ: the comparison is not of the same model")


if __name__ == "__main__":
    main()
