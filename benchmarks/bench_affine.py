"""The two forms of in-pass capture's within-pair affine products, side by side, by sequence length.

    python benchmarks/bench_affine.py [--lengths 16 24 32 64 128 256] [--pairs 2] [--layers 4] [--width 128]
                                      [--rounds 7] [--threads N] [--device cpu]

``contrib.affine_within_blocks`` reduces every affine layer of a micro-batch at once, per pair either as one
2T x 2T block of position products (the pair's chosen then rejected positions together) or as three T x T blocks
(chosen with itself, rejected with itself, chosen with rejected: 3T² instead of 4T² products, from ``SPLIT_PAIRS``
positions per sequence on). This times both forms on the calls of a GPT-2 block stack (per layer the attention's
input and output projections and the MLP's two, widths d -> 3d, d -> d, d -> 4d, 4d -> d) with random inputs and
output gradients, ``--pairs`` pairs of ``T`` positions, the rows scaled as in-pass capture scales them. Each round
times both forms once, in turn; the table gives each form's fastest round (ms per call of the function), their
ratio, and the form the library picks at that length.
"""

from __future__ import annotations

import argparse
import time


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 24, 32, 64, 128, 256])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    import torch

    from entangle.capture import contrib

    if args.threads:
        torch.set_num_threads(args.threads)
    d, n = args.width, 2 * args.pairs
    shapes = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)] * args.layers
    generator = torch.Generator(device=args.device).manual_seed(0)
    scale = torch.rand(n, dtype=torch.float64, generator=generator, device=args.device) + 0.5
    picked = contrib.SPLIT_PAIRS

    def timed(inputs, grads, split: bool, reps: int) -> tuple[float, tuple]:
        """ms per call of one form, and its result."""
        contrib.SPLIT_PAIRS = 1 if split else 1 << 30
        try:
            contrib.affine_within_blocks(inputs, grads, torch.float32, scale)            # warm-up
            if args.device != "cpu":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(reps):
                got = contrib.affine_within_blocks(inputs, grads, torch.float32, scale)
            if args.device != "cpu":
                torch.cuda.synchronize()
            return (time.perf_counter() - start) / reps * 1e3, got
        finally:
            contrib.SPLIT_PAIRS = picked

    print(f"within-pair affine products: {len(shapes)} calls ({args.layers} GPT-2 blocks of width {d}), "
          f"{args.pairs} pairs, {torch.get_num_threads()} threads, {args.device}; fastest of {args.rounds} rounds")
    print("| T | one 2T x 2T block (ms) | three T x T blocks (ms) | three / one | picked |")
    print("|---|---|---|---|---|")
    for t in args.lengths:
        inputs = [torch.randn(n, t, a, generator=generator, device=args.device) for a, _ in shapes]
        grads = [torch.randn(n, t, b, generator=generator, device=args.device) for _, b in shapes]
        reps = max(1, int(2e8 // (len(shapes) * n * 4 * t * t * 4 * d)))      # ~0.1 s of products per round
        one, three = [], []
        for _ in range(args.rounds):
            ms, a = timed(inputs, grads, False, reps)
            one.append(ms)
            ms, b = timed(inputs, grads, True, reps)
            three.append(ms)
        mask = ~a[0].isnan()
        if not torch.allclose(a[0][mask], b[0][mask], rtol=1e-4, atol=1e-4 * float(a[0][mask].abs().max())):
            raise RuntimeError(f"the two forms differ at T = {t}")
        print(f"| {t} | {min(one):.3f} | {min(three):.3f} | {min(three) / min(one):.2f} | "
              f"{'three' if t >= picked else 'one'} |")


if __name__ == "__main__":
    main()
