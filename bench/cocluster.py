"""Benchmark: xcm's co-clustering against scikit-learn's SpectralCoclustering, side by side.

    python bench/cocluster.py            # GPT-2 (3072 x 768) and Gemma-2B (16384 x 2048) MLP sizes, k = 4 and 8
    python bench/cocluster.py --quick    # GPT-2 size only
    python bench/cocluster.py --gpt2-mlps --markdown  # all 24 GPT-2 MLP matrices, k = 4: xcm on the GPU vs sklearn

Both run on the same planted block-diagonal matrices (std 1 inside the blocks, 0.3 or 0.5 outside, rows
and columns shuffled) and are scored by adjusted Rand index against the planted rows and columns.
scikit-learn gets |W|: its co-clustering needs a non-negative matrix and, given signed weights, finds
nothing (ARI ~ 0), since row sums of signed weights cancel. xcm runs on the GPU when there is one (the matrix
is copied there first, outside the timing, as the partitioner's weights already are; the clock stops after
the device finishes), scikit-learn on the CPU.
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.cluster import SpectralCoclustering
from sklearn.metrics import adjusted_rand_score

from orchestrator.modularity import cocluster, planted_blocks

SIZES = {"gpt2 3072x768": (3072, 768), "gemma-2b 16384x2048": (16384, 2048)}
CLUSTER_COUNTS = (4, 8)
NOISES = (0.3, 0.5)  # std outside the blocks; at 0.5 the blocks hold 1/3 (k=4) or 1/5 (k=8) of |W|'s mass


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPT2_MLPS = 24  # 12 blocks x (c_fc 3072 x 768, c_proj 768 x 3072) as [n_out, n_in]


def timed(function):
    synchronise()
    start = time.perf_counter()
    result = function()
    synchronise()
    return result, time.perf_counter() - start


def synchronise() -> None:
    """Wait for the GPU's queued work, so the clock covers it (nothing on CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def compare(n_out: int, n_in: int, k: int, noise: float, seed: int = 0) -> dict:
    """Time and ARI (rows, columns) of both co-clusterings on one planted matrix."""
    weight, rows, cols = planted_blocks(n_out, n_in, k, noise=noise, seed=seed)
    on_device = weight.to(DEVICE)
    (row_labels, col_labels), xcm_seconds = timed(lambda: cocluster(on_device, k))
    row_labels, col_labels = row_labels.cpu(), col_labels.cpu()
    reference, sklearn_seconds = timed(
        lambda: SpectralCoclustering(n_clusters=k, random_state=0).fit(weight.abs().numpy())
    )
    return {
        "xcm_s": xcm_seconds,
        "sklearn_s": sklearn_seconds,
        "xcm_ari": (adjusted_rand_score(rows, row_labels), adjusted_rand_score(cols, col_labels)),
        "sklearn_ari": (
            adjusted_rand_score(rows, reference.row_labels_),
            adjusted_rand_score(cols, reference.column_labels_),
        ),
    }


def gpt2_mlps(count: int, markdown: bool) -> None:
    """The partitioner's whole job on GPT-2 124M: ``count`` planted matrices of its MLP shapes (k = 4, noise
    0.3), total seconds of each library and the mean ARI over rows and columns."""
    shapes = [(3072, 768) if index % 2 == 0 else (768, 3072) for index in range(count)]
    results = [compare(n_out, n_in, 4, 0.3, seed=index) for index, (n_out, n_in) in enumerate(shapes)]
    xcm_s, sklearn_s = sum(r["xcm_s"] for r in results), sum(r["sklearn_s"] for r in results)
    xcm_ari = sum(sum(r["xcm_ari"]) / 2 for r in results) / count
    sklearn_ari = sum(sum(r["sklearn_ari"]) / 2 for r in results) / count
    if markdown:
        print(f"| co-clustering | {count} GPT-2 MLP matrices, k = 4 | xcm ({DEVICE.type}) | scikit-learn (CPU) |")
        print("|---|---|---|---|")
        print(f"| | seconds | {xcm_s:.2f} | {sklearn_s:.2f} |")
        print(f"| | mean ARI | {xcm_ari:.3f} | {sklearn_ari:.3f} |")
        print(f"| | speed-up | {sklearn_s / xcm_s:.1f}x | |")
        return
    print(
        f"{count} GPT-2 MLP matrices, k = 4: xcm on {DEVICE.type} {xcm_s:.2f} s (ARI {xcm_ari:.3f}), "
        f"scikit-learn {sklearn_s:.2f} s (ARI {sklearn_ari:.3f}): {sklearn_s / xcm_s:.1f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="GPT-2 size only")
    parser.add_argument(
        "--gpt2-mlps",
        type=int,
        nargs="?",
        const=GPT2_MLPS,
        metavar="N",
        help=f"time N (default {GPT2_MLPS}) GPT-2 MLP-sized matrices end to end instead",
    )
    parser.add_argument("--markdown", action="store_true", help="--gpt2-mlps: a Markdown table")
    args = parser.parse_args()
    if args.gpt2_mlps:
        compare(256, 64, 4, 0.3)  # warm up both libraries (and the GPU's kernels)
        gpt2_mlps(args.gpt2_mlps, args.markdown)
        return
    sizes = dict(list(SIZES.items())[:1]) if args.quick else SIZES
    compare(256, 64, 4, 0.3)  # warm up both libraries so the first row does not pay for it
    print(f"xcm on {DEVICE.type}; torch threads: {torch.get_num_threads()}")
    print(
        f"{'matrix':<22}{'k':>3}{'noise':>7}{'xcm s':>9}{'sklearn s':>11}{'xcm/sk':>8}"
        f"{'xcm ARI rows/cols':>20}{'sklearn ARI rows/cols':>24}"
    )
    for label, (n_out, n_in) in sizes.items():
        for k, noise in [(k, noise) for k in CLUSTER_COUNTS for noise in NOISES]:
            r = compare(n_out, n_in, k, noise)
            ratio = r["xcm_s"] / r["sklearn_s"]
            print(
                f"{label:<22}{k:>3}{noise:>7.1f}{r['xcm_s']:>9.2f}{r['sklearn_s']:>11.2f}{ratio:>8.2f}"
                f"{r['xcm_ari'][0]:>13.3f} /{r['xcm_ari'][1]:.3f}{r['sklearn_ari'][0]:>17.3f} /"
                f"{r['sklearn_ari'][1]:.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
