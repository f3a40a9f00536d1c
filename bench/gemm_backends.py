"""CPU matrix-product kernels for the products of a LoRA training step: PyTorch's default (MKL) against oneDNN.

For each product of SmolLM2-135M at 8 x 128 tokens (the frozen projections' forward, their input gradient in
backward, the output head on a 512-row chunk), the kernels alternate over the rounds; the medians and the
achieved GFLOP/s are printed as a markdown table. This is what ``lorakit.fastpath.linear`` chooses between
(``LORAKIT_CPU_GEMM``).

    .venv/bin/python bench/gemm_backends.py [--rounds 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lorakit.fastpath import cpu_description

# (name, rows, d_in, d_out) of SmolLM2-135M's products at 8 x 128 tokens
SHAPES = [
    ("q/o projection", 1024, 576, 576),
    ("k/v projection", 1024, 576, 192),
    ("gate/up projection", 1024, 576, 1536),
    ("down projection", 1024, 1536, 576),
    ("output head, 512-row chunk", 512, 576, 49152),
]


def kernels(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> dict:
    onednn = torch.ops.mkldnn._linear_pointwise
    return {
        "forward x W^T, MKL": lambda: torch.mm(x, w.T),
        "forward x W^T, oneDNN": lambda: onednn(x, w, None, "none", [], ""),
        "input gradient g W, MKL": lambda: torch.mm(g, w),
        "input gradient g W, oneDNN": lambda: onednn(g, w.t(), None, "none", [], ""),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not torch.backends.mkldnn.is_available():
        print("error: this torch build has no oneDNN")
        return 1
    print(f"{cpu_description()}, torch {torch.__version__}, {args.threads} threads\n")
    print("| product | rows x d_in -> d_out | kernel | median (ms) | GFLOP/s |")
    print("|---|---|---|---|---|")
    torch.manual_seed(0)
    for name, rows, d_in, d_out in SHAPES:
        x, w, g = torch.randn(rows, d_in), torch.randn(d_out, d_in), torch.randn(rows, d_out)
        runs = kernels(x, w, g)
        for fn in runs.values():
            fn()
        times: dict[str, list[float]] = {k: [] for k in runs}
        for r in range(args.rounds):
            for label in runs if r % 2 == 0 else list(runs)[::-1]:
                start = time.perf_counter()
                runs[label]()
                times[label].append(time.perf_counter() - start)
        flop = 2 * rows * d_in * d_out
        for label, ts in times.items():
            median = statistics.median(ts)
            print(f"| {name} | {rows} x {d_in} -> {d_out} | {label} | {median * 1e3:.2f} | {flop / median / 1e9:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
