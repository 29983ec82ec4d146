"""An exported grown network in a plain training loop, against the same architecture written by hand.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_export.py [--epochs 15] [--device cpu]

For each grown network (a host with a fossilized seed, the shapes `esper-fn grow` produces), the
export (`esper_fn.export`: `nn.Sequential` of standard layers, the seed a `Graft` submodule) and a
hand-written `nn.Module` of the same layers (the residual written inline, ``x + conv(relu(conv(x)))``,
no blend weight) train in the same plain loop: `torch.optim.Adam` (lr 1e-2), MNIST-1D, batch 100,
30 steps per epoch, the same batches. Epochs of the two alternate (export, hand, hand, export, ...)
so both see the same machine load and neither always runs first; the table gives the median seconds per epoch of each and the ratio
export / hand. Before timing, the hand-written network is loaded with the export's weights and its
output is checked against the export's (they compute the same function).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import esper_fn as ef
from esper_fn.tasks import load


class HandMLP(nn.Module):
    """mlp-impaired (40-16-10) with a residual Conv1d block on its input, written by hand."""

    def __init__(self, kernel: int = 5, hidden: int = 16):
        super().__init__()
        self.conv1 = nn.Conv1d(1, hidden, kernel, padding=kernel // 2)
        self.conv2 = nn.Conv1d(hidden, 1, kernel, padding=kernel // 2)
        self.fc1 = nn.Linear(40, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        x = x + self.conv2(F.relu(self.conv1(x.unsqueeze(1)))).squeeze(1)
        return self.fc2(F.relu(self.fc1(x)))

    def load_from(self, net):
        seed = net.input.seed
        pairs = [(self.conv1, seed.conv1), (self.conv2, seed.conv2), (self.fc1, net.fc1), (self.fc2, net.fc2)]
        _copy(pairs)


class HandCNN(nn.Module):
    """cnn-impaired (conv 1->4 k5 s2, 4->4 k3 s2, fc 40->10) with a residual Conv1d block after conv1."""

    def __init__(self, kernel: int = 3, hidden: int = 16):
        super().__init__()
        self.conv1 = nn.Conv1d(1, 4, 5, stride=2, padding=1)
        self.seed1 = nn.Conv1d(4, hidden, kernel, padding=kernel // 2)
        self.seed2 = nn.Conv1d(hidden, 4, kernel, padding=kernel // 2)
        self.conv2 = nn.Conv1d(4, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(40, 10)

    def forward(self, x):
        h = self.conv1(x.unsqueeze(1))
        h = F.relu(h + self.seed2(F.relu(self.seed1(h))))
        h = F.relu(self.conv2(h))
        return self.fc(h.flatten(1))

    def load_from(self, net):
        g = net.conv1
        _copy([(self.conv1, g.layer), (self.seed1, g.seed.conv1), (self.seed2, g.seed.conv2), (self.conv2, net.conv2),
               (self.fc, net.fc)])


def _copy(pairs):
    with torch.no_grad():
        for dst, src in pairs:
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)


def grown(host_name: str, slot: str, bid: str, device) -> ef.State:
    """The host with a fossilized seed at `slot` (a structure `esper-fn grow` produces)."""
    host = ef.hosts.preset(host_name)
    g = torch.Generator().manual_seed(0)
    s = ef.init(host, generator=g, device=device)
    s = ef.germinate(s, slot, bid, generator=g, tempo=1)
    s = ef.tick(ef.advance(ef.advance(s, slot), slot))
    x, y = torch.randn(100, 40, generator=g).to(device), torch.randint(0, 10, (100,), generator=g).to(device)
    for _ in range(5):  # give the zero-born seed non-zero weights
        s, _ = ef.train_step(s, x, y)
    return ef.fossilize(ef.advance(s, slot), slot, force=True)


def epoch_fn(net: nn.Module, task, device):
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)

    def run():
        net.train()
        for xb, yb in task.batches("train", 100, generator=g):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(xb), yb).backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=15, help="timed epochs of each network (default 15)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    task = load("mnist1d", seed=0, device=device)
    rows = []
    for label, (host, slot, bid), hand in (
        ("mlp-impaired + conv1d_k5 at input", ("mlp-impaired", "input", "conv1d_k5"), HandMLP()),
        ("cnn-impaired + conv1d_k3 at conv1", ("cnn-impaired", "conv1", "conv1d_k3"), HandCNN()),
    ):
        state = grown(host, slot, bid, device)
        net = ef.export(state)
        hand = hand.to(device)
        hand.load_from(net)
        x = task.x_val[:256]
        net.eval(), hand.eval()
        with torch.no_grad():
            diff = float((net(x) - hand(x)).abs().max())
        assert diff <= 1e-5, (label, diff)
        n_net, n_hand = (sum(p.numel() for p in m.parameters()) for m in (net, hand))
        assert n_net == n_hand, (n_net, n_hand)
        runs = {"export": epoch_fn(net, task, device), "hand": epoch_fn(hand, task, device)}
        for fn in runs.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {k: [] for k in runs}
        for i in range(args.epochs):
            for k in (("export", "hand") if i % 2 == 0 else ("hand", "export")):  # ABBA: no order bias
                t = time.perf_counter()
                runs[k]()
                times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append((label, n_net, med["export"], med["hand"], med["export"] / med["hand"], diff))
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"median of {args.epochs} epochs (30 Adam steps of batch 100 each)\n")
    print(f"| network | params | export s/epoch | hand-written s/epoch | export / hand | max |out diff| |")
    print("|---|---|---|---|---|---|")
    for label, n, a, b, r, d in rows:
        print(f"| {label} | {n} | {a:.4f} | {b:.4f} | {r:.2f} | {d:.1e} |")


if __name__ == "__main__":
    main()
