"""A masked random policy over MorphogenesisEnv: what growth does random control cause?

N impaired MLPs train on MNIST-1D in one batched env. Every epoch each row takes a uniformly random
*legal* action (read from the env's action mask): wait, or germinate some blueprint at some slot
with some tempo, or decide fossilize/prune for a seed the env has brought to HOLDING. At the end the
script prints each row's growth: what it grafted, what it kept, parameters and accuracy.

    python examples/random_rollout.py --envs 4 --epochs 30 --seed 0
"""

import argparse
import collections

import torch

from esper_fn.envs import MorphogenesisEnv
from esper_fn.training import evaluate

p = argparse.ArgumentParser()
p.add_argument("--envs", type=int, default=4)
p.add_argument("--epochs", type=int, default=30)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--wait", type=float, default=0.8, help="probability of WAIT at each step (random growth is costly)")
p.add_argument("--train-subset", type=int, default=None, help="train on the first n samples only (smoke runs)")
args = p.parse_args()
torch.set_num_threads(1)

env = MorphogenesisEnv(task="mnist1d", host="mlp-impaired", num_envs=args.envs, max_epochs=args.epochs,
                       seed=args.seed, subset={"train": args.train_subset} if args.train_subset else None)
g = torch.Generator().manual_seed(args.seed)  # the policy's own randomness


def masked_random(td):
    """WAIT with probability --wait, else a uniform draw among the legal non-WAIT actions."""
    mask = td["action_mask"].clone()
    other = mask[:, 1:].any(-1)
    wait = (torch.rand(len(mask), generator=g) < args.wait) | ~other
    mask[:, 0] = False
    mask[~other, 0] = True  # rows with nothing but WAIT legal
    action = torch.multinomial(mask.float(), 1, generator=g).squeeze(-1)
    td.set("action", torch.where(wait, torch.zeros_like(action), action))
    return td


print(f"{env}\n{args.envs} rows x {args.epochs} epochs, masked random policy (P(wait) = {args.wait})")
td = env.rollout(args.epochs, masked_random)
print()
for i in range(args.envs):
    counts = collections.Counter()
    for t, a in enumerate(td["action"][i].tolist()):
        if a:
            op = env.action_space.decode(a)
            counts[op.op.name] += 1
            desc = env.action_space.describe(a, env.state(i).slot_names)
            print(f"row {i} epoch {t:>3}: {desc}")
    m = td["next", "metrics"][i, -1]
    state = env.state(i)
    stages = {n: s.name for n, s in state.stages().items() if s.name != "DORMANT"}
    task = env.context(i).task
    test = evaluate(state, task.x_test, task.y_test)["accuracy"]  # outside the env: never a reward
    print(f"row {i} (run seed {env.run_seed(i)}): {dict(counts) or 'no growth'}; seeds now {stages or 'none'}; "
          f"params {int(td['metrics', 'params'][i, 0])} -> {int(m['params'])}; "
          f"val {td['next', 'metrics', 'val_accuracy'][i, 0]:.3f} -> {m['val_accuracy']:.3f}; "
          f"test {test:.3f}; rollbacks {int(m['rollbacks'])}; return {td['next', 'reward'][i].sum():+.3f}\n")
