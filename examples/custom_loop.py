"""A hand-written growth loop on MNIST-1D, using only esper_fn's functional API.

The host is an impaired MLP (40-16-10, 826 parameters; ~55% test accuracy when trained alone).
The loop makes its own growth decision: when validation accuracy stops improving, it grafts a
residual 1D-conv seed on the raw input, lets it incubate (shadow training: the live network is
unchanged), blends it in over a few epochs, checks that it helps, and fossilizes or prunes it.
At the end it exports the grown network as a plain nn.Module, then sculpts it (Emrakul: the units
that contribute least go) and exports the smaller network.

    python examples/custom_loop.py --epochs 60 --seed 0
"""

import argparse

import torch
import torch.nn.functional as F

import esper_fn as ef
from esper_fn.tasks import load
from esper_fn.training import telemetry

p = argparse.ArgumentParser()
p.add_argument("--epochs", type=int, default=60)
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()
torch.set_num_threads(1)

# MNIST-1D's standard 4000 training samples split 3000 train / 1000 val; its 1000 test samples stay test.
task = load("mnist1d", seed=args.seed)  # 3000 train / 1000 val / 1000 test, x: [N, 40]
g = torch.Generator().manual_seed(args.seed)
host = ef.hosts.preset("mlp-impaired", input_shape=task.input_shape, n_classes=task.n_classes)  # 40-16-10
state = ef.init(host, optimizer=ef.optim.adam(1e-2), generator=g)


def accuracy(state, x, y):
    return (ef.apply(state, x).argmax(-1) == y).float().mean().item()


# Our fossilize rule as a gate: keep the seed only if its measured contribution on the validation
# split, less 1.645 standard errors of the per-sample difference, exceeds one accuracy point.
gates = ef.GateConfig(min_contribution=0.01)
best, stall, slot = 0.0, 0, "input"
for epoch in range(args.epochs):
    for xb, yb in task.batches("train", 100, generator=g):
        state, metrics = ef.train_step(state, xb, yb)
    val = accuracy(state, task.x_val, task.y_val)
    stage = state.stage(slot)

    # --- growth decisions: our own rules, applied with pure functions ---------------------
    if stage == ef.Stage.DORMANT and stall >= 2 and state.n_seeds == 0:
        state = ef.germinate(state, slot, "conv1d_k5", generator=g, tempo=5)
        state = ef.advance(state, slot)  # GERMINATED -> TRAINING (incubation)
        print(f"epoch {epoch:3d}: plateau at {val:.3f}; germinated conv1d_k5 at {slot!r} "
              f"({state.num_params()} params)")
    elif stage == ef.Stage.TRAINING and state.slots["epochs"][0] >= 3:
        state = ef.advance(state, slot)  # -> BLENDING: alpha ramps 0 -> 1 over `tempo` epochs
    elif stage == ef.Stage.BLENDING and state.slots["alpha"][0] >= 1:
        state = ef.advance(state, slot)  # -> HOLDING at alpha 1
    elif stage == ef.Stage.HOLDING:
        # The telemetry the gates read: "<slot>/contribution" (validation accuracy with the seed minus
        # without it) and "<slot>/contribution_se" (its standard error), measured on the validation split.
        tel = telemetry(state, task, {})
        c, se = tel[f"{slot}/contribution"], tel[f"{slot}/contribution_se"]
        if ef.Op.FOSSILIZE in ef.legal_actions(state, gates=gates, telemetry=tel)[slot]["ops"]:
            state = ef.fossilize(state, slot, gates=gates, telemetry=tel)
            print(f"epoch {epoch:3d}: seed adds {c:+.3f} +- {se:.3f} accuracy; fossilized")
        else:
            state = ef.prune(state, slot)
            print(f"epoch {epoch:3d}: seed adds {c:+.3f} +- {se:.3f}; pruned")
    state = ef.tick(state)  # one epoch passes: alpha ramps, embargoes count down

    stall = 0 if val > best + 0.005 else stall + 1
    best = max(best, val)
    if epoch % 10 == 0 or epoch == args.epochs - 1:
        print(f"epoch {epoch:3d}: loss {metrics['loss']:.3f}  val {val:.3f}  stage {state.stage(slot).name}")

model = ef.export(state)  # a plain nn.Module with the same outputs as ef.apply
test = (model(task.x_test).argmax(-1) == task.y_test).float().mean().item()
print(f"test accuracy {test:.3f} with {sum(p.numel() for p in model.parameters())} parameters "
      f"(host alone: {host.config['widths']}, 826 parameters)")
assert torch.equal(model(task.x_val), ef.apply(state, task.x_val))
print(f"export check: nn.Module output == ef.apply output; test loss {F.cross_entropy(model(task.x_test), task.y_test):.3f}")

# --- Emrakul: give back what the grown network does not need --------------------------------
# Remove the hidden units (of the fossilized seed and the host's hidden layer) that contribute least
# on the validation split, down to 90% of the parameters, then train a few more epochs. Pure: `state`
# is unchanged; the report says what was removed and what it cost before the fine-tune.
if ef.sculptable(state):
    small, report = ef.sculpt(state, keep=0.9, data=(task.x_val, task.y_val))
    for _ in range(5):
        for xb, yb in task.batches("train", 100, generator=g):
            small, _ = ef.train_step(small, xb, yb)
    small_model = ef.export(small)
    test_small = (small_model(task.x_test).argmax(-1) == task.y_test).float().mean().item()
    print(f"sculpted: {state.num_params()} -> {small.num_params()} parameters "
          f"({', '.join(f'{t.slot} {t.units_before}->{t.units_after} units' for t in report.targets)}); "
          f"test accuracy {test_small:.3f} after 5 more epochs")
    assert torch.equal(small_model(task.x_val), ef.apply(small, task.x_val))
