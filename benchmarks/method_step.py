"""CPU milliseconds per training iteration and parameter counts of the Table 1 methods (docs/methods.md).

    python benchmarks/method_step.py [--methods cps dhc ...] [--iterations 20] [--threads 1]

Each method is built as the trainer builds it (skcdf.methods.plugin) at the ``phantom_tiny`` size —
patch 32x32x32, 8 filters, no dropout, 2 labeled + 2 unlabeled volumes per step, K = 14 — and its own
step (forwards, backward, every optimiser's step) is timed on random volumes after 3 warm-up iterations.
Reports the median milliseconds per iteration, and the parameter counts of all its networks and of
those that predict, at that size and at the paper's (32 filters). Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _machine import cpu_name  # benchmarks/ is on sys.path when a script here runs
from skcdf import methods
from skcdf.methods.plugin import Context, MethodNet, MethodTraining

NUM_CLASSES = 14
PATCH = (32, 32, 32)
BATCH = 2


def _parameters(method: str, filters: int) -> tuple[int, int]:
    """(all networks, the networks that predict) parameter counts of ``method`` at ``filters``."""
    net = MethodNet(method, 1, NUM_CLASSES, filters, dropout=True)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    return count(net), sum(count(net.networks[name]) for name in net.recipe.inference)


def time_step(method: str, iterations: int) -> float:
    """Median milliseconds of one training iteration of ``method`` at the phantom_tiny size."""
    torch.manual_seed(0)
    net = MethodNet(method, 1, NUM_CLASSES, 8, dropout=False)

    def new_optimizer(network: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(network.parameters(), lr=0.3, momentum=0.9, nesterov=True, weight_decay=3e-5)

    counts = torch.randint(1, 1000, (NUM_CLASSES,)).double()
    context = Context(NUM_CLASSES, PATCH, counts, 16, BATCH, 8, 300, 0.1, new_optimizer, torch.device("cpu"))
    training = MethodTraining(net, new_optimizer(net.networks[net.recipe.trained]), context)
    times = []
    for i in range(iterations + 3):
        x_l, x_u = torch.randn(BATCH, 1, *PATCH), torch.randn(BATCH, 1, *PATCH)
        y_l = torch.randint(0, NUM_CLASSES, (BATCH, *PATCH))
        start = time.perf_counter()
        training.step(x_l, y_l, x_u, epoch=50)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=methods.plugin_names())
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {cpu_name()}, {args.threads} thread(s), torch {torch.__version__}; median of {args.iterations}")
    print("method | ms/iteration (phantom_tiny) | parameters, all networks (8 / 32 filters) | predicting (8 / 32)")
    for method in args.methods:
        small, large = _parameters(method, 8), _parameters(method, 32)
        print(f"{method} | {time_step(method, args.iterations):.0f} | {small[0]:,} / {large[0]:,} | "
              f"{small[1]:,} / {large[1]:,}", flush=True)


if __name__ == "__main__":
    main()
