"""Train Tamiyo (a GATv2 actor-critic) with PPO on MorphogenesisEnv, CleanRL style: one file, top to
bottom, every PPO detail visible. `esper-fn train-tamiyo` runs the same loop from the library
(`esper_fn.policies.train_ppo`), with checkpoints and resume.

    OMP_NUM_THREADS=1 python examples/train_tamiyo_ppo.py --iterations 50 --out runs/tamiyo-example

Copy it and change what you like: the reward, the contexts, the network size, the losses.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.objectives import ClipPPOLoss
from torchrl.objectives.value import GAE
from torchrl.record import CSVLogger

from esper_fn.envs import MorphogenesisEnv
from esper_fn.policies import action_stats, harm_labels, make_tamiyo, save_tamiyo, tamiyo_parameters

with warnings.catch_warnings():  # torchrl 0.14.1 warns about its own classes while importing collectors
    warnings.filterwarnings("ignore", message=r".*WeightUpdaterBase is deprecated.*", category=DeprecationWarning)
    from torchrl.collectors import Collector


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hosts", default="mlp-impaired")
    p.add_argument("--num-envs", type=int, default=8)
    p.add_argument("--epochs", type=int, default=30, help="epochs per episode")
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--ppo-epochs", type=int, default=4)
    p.add_argument("--minibatch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--entropy-coeff", type=float, default=0.01)
    p.add_argument("--subset-train", type=int, default=None, help="first N training samples (quick runs)")
    p.add_argument("--blueprints", default=None, help="comma-separated ids (default: the whole catalogue)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/tamiyo-example")
    args = p.parse_args()
    torch.manual_seed(args.seed)  # network init and action sampling (a script may own the global RNG)
    torch.set_num_threads(1)
    out = Path(args.out)

    # --- the environment: N hosts trained in lockstep, one step = one epoch -------------------
    env = MorphogenesisEnv(
        contexts=[("mnist1d", h) for h in args.hosts.split(",")], num_envs=args.num_envs, max_epochs=args.epochs,
        seed=args.seed, subset={"train": args.subset_train} if args.subset_train else None,
        blueprints=args.blueprints.split(",") if args.blueprints else None)
    space = env.action_space  # the flat action layout (esper_fn.actions.ActionSpace)
    N, T = args.num_envs, args.epochs

    # --- the agent: GATv2 trunk, flat masked logits, value ensemble, safety head --------------
    actor, critic = make_tamiyo(env.observation_spec, env.action_spec, blueprints=space.blueprints,
                                tempos=space.tempos, hidden=64, wait_bias=3.0)
    params = tamiyo_parameters(actor, critic)  # the trunk is shared: each parameter once
    common, head = actor.module[0], actor.module[1]
    optimizer = torch.optim.Adam(params, lr=args.lr, eps=1e-5)

    # --- PPO pieces ----------------------------------------------------------------------------
    # Whole episodes per batch ([N, T]): GAE sees complete returns, and `terminated` at the budget
    # means no bootstrap there (docs/env.md).
    collector = Collector(env, actor, frames_per_batch=N * T, total_frames=N * T * args.iterations,
                          auto_register_policy_transforms=False, trust_policy=True)
    gae = GAE(gamma=0.99, lmbda=0.95, value_network=critic, deactivate_vmap=True)  # PyG: no vmap
    loss_module = ClipPPOLoss(actor, critic, clip_epsilon=0.2, entropy_coeff=args.entropy_coeff,
                              critic_coeff=0.5, loss_critic_type="l2", normalize_advantage=True)
    logger = CSVLogger("ppo", log_dir=str(out / "logs"))
    shuffle = torch.Generator().manual_seed(args.seed + 1)

    t0 = time.perf_counter()
    for it, data in enumerate(collector):  # data: [N, T], the action mask included
        for g in optimizer.param_groups:  # linear LR annealing
            g["lr"] = args.lr * (1 - it / args.iterations)
        harm = harm_labels(data, space)  # safety-head targets: rollbacks, negative contributions
        boot = torch.rand(*data.shape, actor.tamiyo_config.value_heads, generator=shuffle) < 0.5
        for _ in range(args.ppo_epochs):
            with torch.no_grad():
                gae(data)  # recomputed every epoch on [N, T], with the current critic
            flat = data.reshape(-1)
            for idx in torch.randperm(flat.shape[0], generator=shuffle).split(args.minibatch_size):
                mb = flat[idx]
                lt = loss_module(mb)  # clipped surrogate + critic + entropy
                aux = head(common(mb.select(*common.in_keys).clone()))
                w = boot.reshape(-1, boot.shape[-1])[idx].float()  # bootstrap masks: heads disagree off-data
                ens = ((aux["value_ensemble"] - mb["value_target"]).pow(2) * w).sum() / w.sum().clamp_min(1)
                taken = aux["harm_logits"].gather(-1, mb["action"].unsqueeze(-1)).squeeze(-1)
                safety = torch.nn.functional.binary_cross_entropy_with_logits(taken, harm.reshape(-1)[idx])
                loss = lt["loss_objective"] + lt["loss_critic"] + lt["loss_entropy"] + 0.5 * ens + 0.1 * safety
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 0.5)
                optimizer.step()
        with torch.no_grad():
            gae(data)
        done = data["next", "done"].squeeze(-1)
        target, value = data["value_target"].flatten(), data["state_value"].flatten()
        scalars = {
            "episode_return": float(data["next", "reward"].sum() / done.sum()),
            "final_val_accuracy": float(data["next", "metrics", "val_accuracy"][done].mean()),
            "explained_variance": float(1 - (target - value).var() / target.var()),
            "entropy": float(lt["entropy"]), "approx_kl": float(lt["kl_approx"]),
            "clip_fraction": float(lt["clip_fraction"]), **action_stats(data, space),
        }
        for k, v in scalars.items():
            logger.log_scalar(k, v, step=it + 1)
        print(f"it {it + 1:3d}  {time.perf_counter() - t0:6.0f}s  return {scalars['episode_return']:+.3f}  "
              f"val acc {scalars['final_val_accuracy']:.3f}  EV {scalars['explained_variance']:+.2f}  "
              f"entropy {scalars['entropy']:.2f}  KL {scalars['approx_kl']:.4f}  "
              f"germinate {scalars['ops/germinate']:.3f}  fossilize rate {scalars['fossilize_rate']:.2f}")
    collector.shutdown()
    path = save_tamiyo(out / "tamiyo.safetensors", actor, critic, metadata={"seed": args.seed, "example": True})
    print(f"weights: {path}")

    # --- one greedy episode with the trained policy ---------------------------------------------
    env.set_seed(10**6)
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        td = env.rollout(T, actor)
    for i in range(N):
        acts = [env.action_space.describe(int(a)) for a in td["action"][i] if a]
        print(f"row {i}: val acc {float(td['next', 'metrics', 'val_accuracy'][i, -1]):.3f}, decisions {acts}")


if __name__ == "__main__":
    main()
