"""Train steps and epochs on the CPU and on CUDA, side by side in one run (the GPU tier of issue 17).

    OMP_NUM_THREADS=1 python benchmarks/bench_gpu.py [--repeats 5] [--steps 50] [--require-cuda]

For each configuration, the same state (built on the CPU streams, then `State.to(device)`) and the
same data (`Task.to(device)`) on every device this machine has:

- step:  one `esper_fn.train_step` (batch 100 unless stated; seeds incubating in the shadow forward
         and blending, so both forwards run), median over `--steps` steps after a warm-up, with the
         device synchronised around the timed steps;
- epoch: one `esper_fn.training.train_epoch` over the training split (batch 100), median of
         `--repeats` epochs;
- stacked: `train_epochs` over N hosts of one structure (one vectorised group), host-epochs/s.

It also counts host-device synchronisations per epoch on CUDA (`torch.cuda.set_sync_debug_mode`,
"warn"): they must not grow with the number of batches. Without CUDA it prints the CPU rows and says
that the CUDA rows were not measured (or fails with `--require-cuda`).

Then the growth env and Tamiyo on each device (`--env-n`, default 64 256 1024; `--env-n` with no
value skips them):

- env:  `MorphogenesisEnv(device=...)` with `benchmarks/bench_env.py`'s mixed population (half the
        rows with a conv1d_k5 seed at the input, a quarter an mlp_gelu seed after fc1, at alpha 1;
        MNIST-1D, mlp-impaired, full split, batch 100), host-epochs/s of one env step (the median
        of `--repeats` steps);
- ppo:  `train_ppo(..., device=...)` on a 16-row env, two iterations of 16 x 5 frames; the seconds
        of the update (an iteration's seconds minus its collection seconds, the second iteration).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch

import esper_fn as ef
from bench_env import MAKE, kinds, step_batched, warm_actions
from esper_fn.tasks import load
from esper_fn.training import TrainConfig, train_epoch, train_epochs

CONFIGS = [
    # (label, task, host preset, seeds: [(slot, blueprint, live?)], batch size)
    ("mlp-impaired, conv1d_k5 incubating + lora_r4 blending", "mnist1d", "mlp-impaired",
     [("input", "conv1d_k5", False), ("fc1", "lora_r4", True)], 100),
    ("cnn-paper, conv1d_k3 blending", "mnist1d", "cnn-paper", [("conv1", "conv1d_k3", True)], 100),
    ("transformer-small, attention_mhsa blending", "mnist1d-seq", "transformer-small",
     [("block1", "attention_mhsa", True)], 100),
    ("cnn2d-w16 on MNIST-5k images, conv2d_k3 blending", "mnist5k-img", "cnn2d-w16",
     [("conv1", "conv2d_k3", True)], 100),
]


def build(task, host_name: str, seeds) -> ef.State:
    host = ef.hosts.preset(host_name, input_shape=task.input_shape, n_classes=task.n_classes)
    g = torch.Generator().manual_seed(0)
    s = ef.init(host, generator=g)
    for slot, bid, live in seeds:
        s = ef.advance(ef.germinate(s, slot, bid, generator=g, tempo=3), slot)  # TRAINING: shadow forward
        if live:
            s = ef.tick(ef.advance(s, slot))  # BLENDING at alpha 1/3: live forward
    return s


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(state: ef.State, task, device, steps: int, batch: int) -> float:
    x, y = task.split("train")
    xb, yb = x[:batch], y[:batch]
    s, _ = ef.train_step(state, xb, yb)  # warm-up (constants, the slot records' device copy)
    s, _ = ef.train_step(s, xb, yb, donate=True)
    ts = []
    for _ in range(steps):
        sync(device)
        t = time.perf_counter()
        s, _ = ef.train_step(s, xb, yb, donate=True)
        sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def time_epochs(state: ef.State, task, device, repeats: int) -> float:
    cfg = TrainConfig(batch_size=100)
    train_epoch(state, task, cfg, generator=torch.Generator().manual_seed(0))  # warm-up
    ts = []
    for r in range(repeats):
        sync(device)
        t = time.perf_counter()
        train_epoch(state, task, cfg, generator=torch.Generator().manual_seed(r))
        sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def time_population(state: ef.State, task, device, n: int, repeats: int) -> float:
    states = [state] * n  # one structure: one stacked group
    cfg = TrainConfig(batch_size=100)
    gens = lambda r: [torch.Generator().manual_seed(100 * r + j) for j in range(n)]  # noqa: E731
    train_epochs(states, task, cfg, generators=gens(0))  # warm-up
    ts = []
    for r in range(repeats):
        sync(device)
        t = time.perf_counter()
        train_epochs(states, task, cfg, generators=gens(r + 1))
        sync(device)
        ts.append(time.perf_counter() - t)
    return n / statistics.median(ts)


def syncs_per_epoch(state: ef.State, task, batch: int) -> int:
    sync(torch.device("cuda"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_epoch(state, task, TrainConfig(batch_size=batch), generator=torch.Generator().manual_seed(0))
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def env_host_epochs(n: int, device: torch.device, repeats: int) -> float:
    """Host-epochs/s of a mixed-population env step on `device` (bench_env.py's population)."""
    from esper_fn.envs import MorphogenesisEnv

    env = MorphogenesisEnv(num_envs=n, seed=0, device=device, **MAKE)
    env.reset()
    plans = [warm_actions(env.action_space, k) for k in kinds(n, "mixed")]
    for t in range(len(plans[0])):
        step_batched(env, [p[t] for p in plans])
    wait = [0] * n
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        step_batched(env, wait)
        sync(device)
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times)


def ppo_update_seconds(device: torch.device, out) -> float:
    """Seconds of one PPO update (16 rows x 5 epochs, PPOConfig defaults otherwise) on `device`."""
    import functools
    import json

    from esper_fn import GateConfig
    from esper_fn.envs import MorphogenesisEnv
    from esper_fn.policies import PPOConfig, train_ppo

    make = functools.partial(MorphogenesisEnv, task="mnist1d", host="mlp-impaired", num_envs=16, max_epochs=5,
                             subset={"train": 500}, gates=GateConfig(min_training_epochs=1), device=device)
    train_ppo(make, PPOConfig(iterations=2, checkpoint_every=2), out, make().action_space, progress=False,
              tensorboard=False)
    last = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()][-1]
    return last["seconds_iteration"] - last["seconds_collect"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed epochs per row (default 5)")
    ap.add_argument("--steps", type=int, default=50, help="timed train steps per row (default 50)")
    ap.add_argument("--population", type=int, nargs="*", default=[16, 64], help="stacked hosts per row")
    ap.add_argument("--require-cuda", action="store_true", help="fail when CUDA is absent")
    ap.add_argument("--configs", type=int, nargs="*", help="indices into CONFIGS (default: all)")
    ap.add_argument("--env-n", type=int, nargs="*", default=[64, 256, 1024],
                    help="env rows of the mixed-population env rows (none: skip the env and PPO rows)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if args.require_cuda and not cuda:
        print("bench_gpu: --require-cuda, but torch sees no CUDA device", file=sys.stderr)
        return 1
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if cuda else [])
    print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, threads {torch.get_num_threads()}, "
          + (f"GPU {torch.cuda.get_device_name()}" if cuda else "no CUDA device: CUDA rows not measured"))
    rows = []
    chosen = [CONFIGS[i] for i in args.configs] if args.configs else CONFIGS
    for label, task_name, host_name, seeds, batch in chosen:
        base_task = load(task_name, seed=0)
        base = build(base_task, host_name, seeds)
        per = {}
        for dev in devices:
            task, state = base_task.to(dev), base.to(dev)
            per[dev.type] = {
                "step_ms": 1e3 * time_steps(state, task, dev, args.steps, batch),
                "epoch_s": time_epochs(state, task, dev, args.repeats),
                **{f"pop{n}": time_population(state, task, dev, n, max(1, args.repeats // 2))
                   for n in args.population},
            }
            if dev.type == "cuda":
                per["cuda"]["syncs"] = (syncs_per_epoch(state, task, 300), syncs_per_epoch(state, task, 100))
        rows.append((label, per))
    pops = "".join(f" host-epochs/s N={n} |" for n in args.population)
    print(f"\n| configuration | device | train_step ms | epoch s |{pops} syncs/epoch (10 / 30 batches) |")
    print("|---|---|---|---|" + "---|" * len(args.population) + "---|")
    for label, per in rows:
        for dev, m in per.items():
            pop = "".join(f" {m[f'pop{n}']:.1f} |" for n in args.population)
            s = m.get("syncs")
            print(f"| {label} | {dev} | {m['step_ms']:.2f} | {m['epoch_s']:.3f} |{pop} "
                  f"{f'{s[0]} / {s[1]}' if s else '-'} |")
        if "cuda" in per:
            c, g = per["cpu"], per["cuda"]
            print(f"| {label} | cuda speed-up | {c['step_ms'] / g['step_ms']:.2f}x | {c['epoch_s'] / g['epoch_s']:.2f}x |"
                  + "".join(f" {g[f'pop{n}'] / c[f'pop{n}']:.2f}x |" for n in args.population) + " |")
    if args.env_n:
        import tempfile
        from pathlib import Path

        print("\n| device |" + "".join(f" env host-epochs/s N={n} |" for n in args.env_n) + " PPO update s |")
        print("|---|" + "---|" * len(args.env_n) + "---|")
        for dev in devices:
            eps = [env_host_epochs(n, dev, max(1, args.repeats // 2)) for n in args.env_n]
            with tempfile.TemporaryDirectory() as tmp:
                upd = ppo_update_seconds(dev, Path(tmp))
            print(f"| {dev.type} |" + "".join(f" {e:.1f} |" for e in eps) + f" {upd:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
