#!/usr/bin/env python3
"""The peer for scripts/gpu-check.sh: the same architectures as models/ in PyTorch eager on the
GPU, batch 1, f32 and f16, timed like `bench` (wall clock per query, the GPU synchronised).
Weights are random: latency does not depend on their values. Prints one JSON object per line.

    python3 scripts/torch_peer.py [SECONDS_PER_CASE]
"""
import json
import statistics
import sys
import time

import torch
from torch import nn


class Fire(nn.Module):
    def __init__(self, inplanes, squeeze, expand1x1, expand3x3):
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(inplanes, squeeze, 1), nn.ReLU(inplace=True))
        self.expand1x1 = nn.Sequential(nn.Conv2d(squeeze, expand1x1, 1), nn.ReLU(inplace=True))
        self.expand3x3 = nn.Sequential(
            nn.Conv2d(squeeze, expand3x3, 3, padding=1), nn.ReLU(inplace=True)
        )

    def forward(self, x):
        x = self.squeeze(x)
        return torch.cat([self.expand1x1(x), self.expand3x3(x)], 1)


def squeezenet_1_1():
    """SqueezeNet 1.1 (Iandola et al.), as models/squeezenet/model.onnx."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, stride=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, ceil_mode=True),
        Fire(64, 16, 64, 64), Fire(128, 16, 64, 64),
        nn.MaxPool2d(3, 2, ceil_mode=True),
        Fire(128, 32, 128, 128), Fire(256, 32, 128, 128),
        nn.MaxPool2d(3, 2, ceil_mode=True),
        Fire(256, 48, 192, 192), Fire(384, 48, 192, 192),
        Fire(384, 64, 256, 256), Fire(512, 64, 256, 256),
        nn.Dropout(0.5), nn.Conv2d(512, 1000, 1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Softmax(dim=1),
    )


def digits_mlp():
    """scikit-learn's MLPClassifier(64) on 8x8 digits, as models/digits/model.onnx."""
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10), nn.Softmax(dim=1))


def time_case(model, x, seconds):
    with torch.inference_mode():
        for _ in range(20):
            model(x)
        torch.cuda.synchronize()
        samples = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            model(x)
            torch.cuda.synchronize()
            samples.append(time.perf_counter() - t0)
    samples.sort()
    ms = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))] * 1e3
    return {
        "count": len(samples),
        "p50_ms": ms(0.50),
        "p90_ms": ms(0.90),
        "mean_ms": statistics.fmean(samples) * 1e3,
        "inferences_per_s": len(samples) / sum(samples),
    }


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    device = torch.device("cuda")
    cases = [("digits", digits_mlp(), (1, 64)), ("squeezenet", squeezenet_1_1(), (1, 3, 224, 224))]
    for name, model, shape in cases:
        model = model.eval().to(device)
        for precision in ("f32", "f16"):
            m = model.half() if precision == "f16" else model.float()
            x = torch.rand(shape, device=device)
            x = x.half() if precision == "f16" else x
            result = time_case(m, x, seconds)
            result.update(
                model=name, precision=precision, peer="pytorch eager",
                torch=torch.__version__, cuda=torch.version.cuda,
                gpu=torch.cuda.get_device_name(0),
            )
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
