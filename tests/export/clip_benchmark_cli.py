"""Run CLIP_benchmark's own CLI (`clip_benchmark eval ...`) under NumPy >= 2.4.

clip_benchmark 1.6.2's `metrics.zeroshot_classification.accuracy` ends with
`float(<1-element 1-d array>)`, which NumPy 2.4 turned from a deprecation into a TypeError
(the shared environment has NumPy 2.4). This wrapper replaces that one helper, in this process only,
by the same computation taking `.item()`; everything else is clip_benchmark's unchanged code.
Usage: python clip_benchmark_cli.py eval --model ... (the arguments of `clip_benchmark`).
"""
import sys

import clip_benchmark.metrics.zeroshot_classification as zeroshot_classification


def accuracy(output, target, topk=(1,)):
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


zeroshot_classification.accuracy = accuracy

if __name__ == "__main__":
    from clip_benchmark.cli import main

    sys.argv = ["clip_benchmark", *sys.argv[1:]]
    sys.exit(main())
