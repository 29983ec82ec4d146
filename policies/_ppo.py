"""PPO for Tamiyo: TorchRL `Collector` over the batched env, GAE on [N, T] recomputed every epoch,
`ClipPPOLoss` with the action mask in the batch, minibatched epochs, gradient clipping, a linear LR
schedule, and two auxiliary losses (the value ensemble and the safety head).

`train_ppo` is the library form of ``examples/train_tamiyo_ppo.py`` (which spells the same loop
out top to bottom). It never imports the env: it receives a factory.

Reproducibility: every batch is whole episodes (``frames_per_batch = N * max_epochs``), so after
iteration j each row has played j episodes and the env seeded ``seed + j * N`` continues the same
run-seed enumeration (docs/env.md). A checkpoint holds the weights, the optimizer state, the
global torch RNG (action sampling), the minibatch generator and the warm-start file the run began
from (path and SHA-256, or None); resuming from iteration j reproduces the uninterrupted run bit for
bit.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import warnings

import safetensors
import torch
from pydantic import BaseModel, ConfigDict, Field
from tensordict import TensorDictBase

with warnings.catch_warnings():
    # torchrl 0.14.1 warns about its own VanillaWeightUpdater while importing torchrl.collectors.
    warnings.filterwarnings("ignore", message=r".*WeightUpdaterBase is deprecated.*", category=DeprecationWarning)
    from torchrl.collectors import Collector
from torchrl.objectives import ClipPPOLoss
from torchrl.objectives.value import GAE
from torchrl.record import CSVLogger

from esper_fn import Op
from esper_fn._device import check_device
from esper_fn._errors import ConfigError
from esper_fn.actions import ActionSpace
from esper_fn.checkpoint import CheckpointManager

from ._tamiyo import (FORMAT, TamiyoConfig, TamiyoError, build_tamiyo, config_from_specs, load_into, rebuild_tamiyo,
                      save_tamiyo, tamiyo_parameters, tamiyo_tensors)

__all__ = ["PPOConfig", "action_stats", "harm_labels", "plot_training", "tamiyo_from_checkpoint", "train_ppo"]


class PPOConfig(BaseModel):
    """Hyperparameters of `train_ppo` (defaults: CleanRL's PPO, adapted to short episodes).

    Attributes:
        seed: seeds the env enumeration, the network init and action sampling.
        iterations: collector batches; each batch is ``N * max_epochs`` frames (whole episodes).
        ppo_epochs: passes over each batch.
        minibatch_size: frames per gradient step.
        lr: Adam learning rate (annealed linearly to 0 when `anneal_lr`).
        anneal_lr: linear LR decay over the iterations.
        gamma, lmbda: GAE discount and lambda.
        clip_epsilon: PPO ratio clip.
        entropy_coeff: entropy bonus weight.
        critic_coeff: weight of the critic loss (on the ensemble mean).
        ensemble_coeff: weight of the per-head value loss (each head regresses the target on a
            bootstrap half of the batch, so the heads disagree where data are thin).
        safety_coeff: weight of the safety head's binary cross-entropy.
        max_grad_norm: gradient clipping.
        reward_scale: rewards are multiplied by this before GAE.
        harm_drop: a non-WAIT action after which validation accuracy drops by more than this is
            labelled harmful (as are rollbacks and fossilizing a seed of negative contribution).
        checkpoint_every: iterations between checkpoints (the last iteration is always saved).
        tamiyo: `TamiyoConfig` architecture fields (hidden, heads, layers, value_heads, dropout).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    iterations: int = Field(default=50, ge=1)
    ppo_epochs: int = Field(default=4, ge=1)
    minibatch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=3e-4, gt=0)
    anneal_lr: bool = True
    gamma: float = Field(default=0.99, gt=0, le=1)
    lmbda: float = Field(default=0.95, ge=0, le=1)
    clip_epsilon: float = Field(default=0.2, gt=0)
    entropy_coeff: float = Field(default=0.01, ge=0)
    critic_coeff: float = Field(default=0.5, ge=0)
    ensemble_coeff: float = Field(default=0.5, ge=0)
    safety_coeff: float = Field(default=0.1, ge=0)
    max_grad_norm: float = Field(default=0.5, gt=0)
    reward_scale: float = Field(default=1.0, gt=0)
    harm_drop: float = Field(default=0.05, ge=0)
    checkpoint_every: int = Field(default=5, ge=1)
    tamiyo: dict[str, Any] = Field(default_factory=dict)


def harm_labels(batch: TensorDictBase, space: ActionSpace, *, drop: float = 0.05) -> torch.Tensor:
    """Safety-head targets: 1.0 where the step's action was harmful, else 0.0.

    Harmful: the governor rolled the step back (``metrics/rollbacks`` rose), or the action fossilized
    a seed whose measured contribution was negative, or a non-WAIT action was followed by a
    validation-accuracy drop of more than `drop`.

    Args:
        batch: transitions with ``"action"`` [*B], ``("controller", "contribution")`` [*B, S],
            ``"metrics"`` and ``("next", "metrics")``.
        space: the env's action space.
        drop: the accuracy drop counted as harm.

    Returns:
        float32 [*B].
    """
    action = batch["action"]
    op, slot, _, _ = space.unravel(action)
    rolled = batch["next", "metrics", "rollbacks"] > batch["metrics", "rollbacks"]
    contrib = batch["controller", "contribution"].gather(-1, slot.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    negative = (op == int(Op.FOSSILIZE)) & (contrib < 0)  # NaN (unmeasured) compares False
    fell = (batch["next", "metrics", "val_accuracy"] - batch["metrics", "val_accuracy"]) < -drop
    return (rolled | negative | ((action != 0) & fell)).float()


def action_stats(batch: TensorDictBase, space: ActionSpace, slot_names: list[str] | None = None) -> dict[str, float]:
    """Action frequencies of a batch: per op, per slot and per blueprint (germinations), and the
    fossilize / prune rates (per germination, overall and per blueprint).

    Returns:
        ``{"ops/<op>": fraction of frames, "slot/<s>": germinations at slot s / germinations,
        "blueprint/<name>": germinations of it / germinations, "fossilize_rate", "prune_rate",
        "fossilize_rate/<name>", "prune_rate/<name>"}`` (a rate is verdicts / germinations).
    """
    action = batch["action"].reshape(-1)
    op, slot, bp, _ = (t.tolist() for t in space.unravel(action))
    S, B = space.num_slots, len(space.blueprints)
    seed_bp = batch["slot_blueprint"].reshape(len(op), -1).tolist()
    names = [b.split("@")[0] for b in space.blueprints]
    ops, slots, bps, verdict = Counter(), Counter(), Counter(), Counter()
    for i, o in enumerate(op):
        o = Op(o)
        ops[o.name.lower()] += 1
        if o == Op.GERMINATE:
            slots[slot[i]] += 1
            bps[names[bp[i]]] += 1
        elif o in (Op.FOSSILIZE, Op.PRUNE):
            b = seed_bp[i][slot[i]]
            if b < B:
                verdict[(o.name.lower(), names[b])] += 1
    n, g = max(len(op), 1), max(ops["germinate"], 1)
    out = {f"ops/{k}": ops[k] / n for k in ("wait", "germinate", "advance", "fossilize", "prune")}
    for s in range(S):
        out[f"slot/{slot_names[s] if slot_names and s < len(slot_names) else s}"] = slots[s] / g
    for name, c in bps.items():
        out[f"blueprint/{name}"] = c / g
        out[f"fossilize_rate/{name}"] = verdict[("fossilize", name)] / c
        out[f"prune_rate/{name}"] = verdict[("prune", name)] / c
    out["fossilize_rate"] = ops["fossilize"] / g
    out["prune_rate"] = ops["prune"] / g
    return out


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"optim/{i}/{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).cpu()  # loads onto any device
    return tensors, {"param_groups": sd["param_groups"]}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith("optim/"):
            _, i, k = key.split("/", 2)
            state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _explained_variance(value: torch.Tensor, target: torch.Tensor) -> float:
    var = target.var()
    return float(1 - (target - value).var() / var) if var > 0 else float("nan")


class _Loggers:
    """torchrl's CSVLogger, plus TensorboardLogger when tensorboard is installed."""

    def __init__(self, out: Path, tensorboard: bool):
        self.loggers = [CSVLogger("ppo", log_dir=str(out / "logs"))]
        if tensorboard:
            try:
                from torchrl.record.loggers.tensorboard import TensorboardLogger, _has_tb
            except ImportError:  # torchrl without the tensorboard module: CSV only
                _has_tb = False
            if _has_tb:
                self.loggers.append(TensorboardLogger("ppo", log_dir=str(out / "tb")))

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        for lg in self.loggers:
            for k, v in scalars.items():
                lg.log_scalar(k, float(v), step=step)

    def close(self) -> None:
        for lg in self.loggers:
            files = getattr(lg.experiment, "files", None)
            if files:
                for f in files.values():
                    f.close()
                files.clear()
            if hasattr(lg.experiment, "close"):
                lg.experiment.close()


def train_ppo(make_env: Callable[[], Any], config: PPOConfig, out: str | Path, space: ActionSpace, *,
              resume: bool = False, progress: bool = True, tensorboard: bool = True,
              metadata: Mapping[str, Any] | None = None,
              on_iteration: Callable[[int, dict[str, float]], None] | None = None,
              init: str | Path | None = None, device: torch.device | str | None = None) -> dict[str, Any]:
    """Train Tamiyo with PPO.

    Args:
        make_env: builds the batched env (``MorphogenesisEnv(...)``); its ``batch_size`` [N] and
            ``max_epochs`` fix the batch: ``N * max_epochs`` frames of whole episodes.
        config: hyperparameters.
        out: run directory: ``logs/ppo/scalars/*.csv`` (and ``tb/`` with tensorboard),
            ``checkpoints/step_*`` (`esper_fn.checkpoint.CheckpointManager`: weights, optimizer,
            RNG states), ``tamiyo.safetensors`` (the final policy, `load_tamiyo`), ``history.jsonl``.
        space: the env's action space (``env.action_space``: the safety labels and action statistics
            decode actions with it).
        resume: continue from the latest checkpoint in ``out/checkpoints`` (bit-identical).
        progress: show a tqdm bar.
        tensorboard: also log to TensorBoard when it is installed.
        metadata: JSON extras stored with the final weights (e.g. the command line).
        on_iteration: called with (iteration, scalars) after every iteration.
        init: a `save_tamiyo` file to start from (warm start: weights only; the optimizer, RNG
            and env enumeration start fresh from ``config``). Its architecture (``config.tamiyo``)
            and action layout must match. When ``resume`` finds a checkpoint, the run continues
            from the checkpoint and `init` is not loaded; it must then be None or the same file
            (by SHA-256) the run was warm-started from (recorded in the checkpoints). With
            ``resume`` and no checkpoint yet, the run starts from `init`.
        device: where Tamiyo acts and learns (the collector stores its batches there and the PPO
            update runs there); default the env's device. An env on the CPU with Tamiyo on "cuda"
            is the usual split: the collector moves observations and actions. Checkpoints and the
            final weights hold CPU tensors (they load onto any device); on CUDA the checkpoints
            also keep the device's RNG state, so a resume samples the same actions.

    Returns:
        A summary: iterations run, frames, wall seconds, the last iteration's scalars, the weights
        path.

    Raises:
        ConfigError: the env is not batched with a ``max_epochs`` budget; ``resume`` with a
            different PPO config than the checkpoint's, or with an `init` other than the file the
            checkpointed run started from.
        CheckpointError: ``resume`` with a corrupt checkpoint.
        CapabilityError: a `device` this machine does not have.
        TamiyoError: `init` is not a Tamiyo weights file, or its architecture or action layout
            differs from this run's (the message lists each differing field and its two values).
        FileNotFoundError: `init` does not exist.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpts = CheckpointManager(out / "checkpoints", max_to_keep=2)
    start = 0
    saved = None
    init_meta = None if init is None else {"path": str(init), "sha256": _sha256(init)}
    if resume and ckpts.latest_step() is not None:
        saved = ckpts.restore()
        start = int(saved[1]["iteration"])
        if saved[1]["config"] != json.loads(config.model_dump_json()):
            raise ConfigError(f"--resume with a different PPO config than the checkpoint in {out} "
                              f"(saved: {saved[1]['config']}).")
        # The warm start the run began with: None (cold), {"path", "sha256"}, or "unrecorded" (checkpoints
        # written before it was recorded: not checked).
        recorded = saved[1].get("init", "unrecorded")
        if recorded != "unrecorded":
            if init_meta is not None and (recorded is None or recorded["sha256"] != init_meta["sha256"]):
                started = ("without --init" if recorded is None
                           else f"from --init {recorded['path']} (SHA-256 {recorded['sha256'][:12]}...)")
                raise ConfigError(
                    f"--resume with --init {init} (SHA-256 {init_meta['sha256'][:12]}...), but the run in {out} "
                    f"started {started}; resuming continues from its checkpoint and never loads --init: "
                    "drop --init (or pass the file the run started from), or start a new run in another --out.")
        init_meta = recorded
    with torch.random.fork_rng():  # action sampling uses the global RNG; keep the caller's untouched
        torch.manual_seed(config.seed)
        env = make_env()
        if len(env.batch_size) != 1 or not hasattr(env, "max_epochs"):
            raise ConfigError("train_ppo needs a batched env with batch_size [N] and a max_epochs budget.")
        N, T = int(env.batch_size[0]), int(env.max_epochs)
        device = check_device(device, "train_ppo") or env.device or torch.device("cpu")
        tconf = config_from_specs(env.observation_spec, env.action_spec, blueprints=space.blueprints,
                                  tempos=space.tempos, **config.tamiyo)
        actor, critic, _ = build_tamiyo(tconf, env.action_spec.to(device))
        actor.to(device)
        critic.to(device)
        actor.tamiyo_config = tconf
        params = tamiyo_parameters(actor, critic)
        opt = torch.optim.Adam(params, lr=config.lr, eps=1e-5)
        shuffle = torch.Generator().manual_seed(config.seed + 1)
        if saved is not None:
            load_into(actor, critic, {k[len("model/"):]: v for k, v in saved[0].items() if k.startswith("model/")},
                      where=str(ckpts.directory))
            _load_optimizer(opt, saved[0], saved[1]["optimizer"])
        elif init is not None:
            load_into(actor, critic, _init_tensors(init, tconf), where=str(init))
        env.set_seed(config.seed + start * N)  # whole episodes per batch: the enumeration continues
        collector = Collector(env, actor, frames_per_batch=N * T, total_frames=N * T * (config.iterations - start),
                              auto_register_policy_transforms=False, trust_policy=True, policy_device=device,
                              storing_device=device)
        if saved is not None:  # after the collector's first reset, as in the uninterrupted run
            torch.set_rng_state(saved[0]["rng/torch"])
            shuffle.set_state(saved[0]["rng/shuffle"])
            if device.type == "cuda" and "rng/cuda" in saved[0]:
                torch.cuda.set_rng_state(saved[0]["rng/cuda"], device)
        return _loop(_Session(collector=collector, actor=actor, critic=critic, opt=opt, shuffle=shuffle, config=config,
                              out=out, space=space, ckpts=ckpts, start=start, rows=N, epochs=T, progress=progress,
                              tensorboard=tensorboard, metadata=dict(metadata or {}), on_iteration=on_iteration,
                              init_meta=init_meta))


_ENV_FIELDS = ("node_dim", "global_dim", "blueprints", "tempos")  # fixed by the env, not by config.tamiyo


def _sha256(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init: no Tamiyo weights at {path}.")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _init_tensors(init: str | Path, own: TamiyoConfig) -> dict[str, torch.Tensor]:
    """The tensors of a `save_tamiyo` file, after checking that its config builds the same network
    with the same action layout as `own` (decision-time biases may differ)."""
    with safetensors.safe_open(str(init), framework="pt") as f:
        header = f.metadata() or {}
        if header.get("format") != FORMAT:
            raise TamiyoError(f"init {init} is not a Tamiyo weights file (format {header.get('format')!r}, expected "
                              f"{FORMAT!r}); pass a tamiyo.safetensors written by train-tamiyo (`save_tamiyo`).")
        try:
            theirs = TamiyoConfig.model_validate_json(header["config"])
        except (KeyError, ValueError) as e:
            raise TamiyoError(f"init {init}: no valid Tamiyo config in its header ({e}).") from None
        a, b = theirs.model_dump(), own.model_dump()
        diff = [k for k in b if k not in ("safety_bias", "uncertainty_bias") and a[k] != b[k]]
        if diff:
            what = "; ".join(f"{k}: file {a[k]!r}, this run {b[k]!r}" for k in diff)
            fix = []
            if any(k in _ENV_FIELDS for k in diff):
                fix.append("run with the env the file was trained on (same --blueprints, --tempos, --task/--hosts; "
                           "train-tamiyo records them under metadata.env in the file)")
            if any(k not in _ENV_FIELDS for k in diff):
                fix.append("set the same architecture under `tamiyo:` in the --config YAML (PPOConfig.tamiyo)")
            raise TamiyoError(f"init {init}: a warm start needs the same network and action layout, but the file "
                              f"differs from this run in {what}. To fix: {'; and '.join(fix)}; or train from "
                              "scratch without --init.")
        return {k: f.get_tensor(k) for k in f.keys()}


@dataclass
class _Session:
    """Everything one PPO run holds: the collector and the networks, their optimizer and shuffling
    generator, the config, where it writes, and where it starts."""

    collector: Any
    actor: Any
    critic: Any
    opt: torch.optim.Optimizer
    shuffle: torch.Generator
    config: PPOConfig
    out: Path
    space: ActionSpace
    ckpts: CheckpointManager
    start: int
    rows: int
    epochs: int
    progress: bool
    tensorboard: bool
    metadata: dict[str, Any]
    on_iteration: Callable[[int, dict[str, float]], None] | None
    init_meta: Any


def _loop(run: _Session) -> dict[str, Any]:
    collector, actor, critic, opt, shuffle, config = run.collector, run.actor, run.critic, run.opt, run.shuffle, run.config
    out, space, ckpts, start, N, T = run.out, run.space, run.ckpts, run.start, run.rows, run.epochs
    iterations = config.iterations
    gae = GAE(gamma=config.gamma, lmbda=config.lmbda, value_network=critic, deactivate_vmap=True)
    loss_module = ClipPPOLoss(actor, critic, clip_epsilon=config.clip_epsilon, entropy_coeff=config.entropy_coeff,
                              critic_coeff=config.critic_coeff, loss_critic_type="l2", normalize_advantage=True)
    params = tamiyo_parameters(actor, critic)
    common, head = actor.module[0], actor.module[1]  # GATv2 trunk, logits/harm head (TensorDictModules)
    loggers = _Loggers(out, run.tensorboard)
    bar = None
    if run.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=iterations, initial=start, desc="train-tamiyo", unit="it")
    t0 = t_prev = time.perf_counter()
    last: dict[str, float] = {}
    history = (out / "history.jsonl").open("a")
    try:
        for it, data in enumerate(collector, start=start):
            seconds_collect = time.perf_counter() - t_prev
            if config.anneal_lr:
                for g in opt.param_groups:
                    g["lr"] = config.lr * (1 - it / iterations)
            data.set(("next", "reward"), data["next", "reward"] * config.reward_scale)
            harm = harm_labels(data, space, drop=config.harm_drop)
            boot = (torch.rand(data.shape + (actor.tamiyo_config.value_heads,), generator=shuffle) < 0.5).to(data.device)
            stats: dict[str, list[float]] = {}
            for _ in range(config.ppo_epochs):
                with torch.no_grad():
                    gae(data)  # on the [N, T] batch, with the current critic
                flat, fharm, fboot = data.reshape(-1), harm.reshape(-1), boot.reshape(-1, boot.shape[-1])
                perm = torch.randperm(flat.shape[0], generator=shuffle).to(data.device)  # drawn on the CPU generator
                for idx in perm.split(config.minibatch_size):
                    mb = flat[idx]
                    lt = loss_module(mb)
                    again = head(common(mb.select(*common.in_keys).clone()))  # for the auxiliary losses
                    heads = again["value_ensemble"]
                    target = mb["value_target"].expand_as(heads)
                    w = fboot[idx].float()
                    ens = ((heads - target).pow(2) * w).sum() / w.sum().clamp_min(1)
                    harm_logit = again["harm_logits"].gather(-1, mb["action"].unsqueeze(-1)).squeeze(-1)
                    safety = torch.nn.functional.binary_cross_entropy_with_logits(harm_logit, fharm[idx])
                    loss = (lt["loss_objective"] + lt["loss_critic"] + lt["loss_entropy"]
                            + config.ensemble_coeff * ens + config.safety_coeff * safety)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    gn = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                    opt.step()
                    for k, v in (("loss/objective", lt["loss_objective"]), ("loss/critic", lt["loss_critic"]),
                                 ("loss/entropy", lt["loss_entropy"]), ("loss/ensemble", ens),
                                 ("loss/safety", safety), ("entropy", lt["entropy"]), ("approx_kl", lt["kl_approx"]),
                                 ("clip_fraction", lt["clip_fraction"]), ("grad_norm", gn)):
                        stats.setdefault(k, []).append(float(v.detach().mean()))
            with torch.no_grad():
                gae(data)
            done = data["next", "done"].squeeze(-1)
            scalars = {k: sum(v) / len(v) for k, v in stats.items()}
            scalars.update({
                "explained_variance": _explained_variance(data["state_value"].flatten(), data["value_target"].flatten()),
                "episode_return": float(data["next", "reward"].sum() / max(int(done.sum()), 1)) / config.reward_scale,
                "final_val_accuracy": float(data["next", "metrics", "val_accuracy"][done].mean()),
                "final_param_ratio": float(data["next", "metrics", "param_ratio"][done].mean()),
                "value_uncertainty": float(data["value_uncertainty"].mean()),
                "harm_rate": float(harm.mean()),
                "lr": opt.param_groups[0]["lr"],
                "frames": float((it + 1) * N * T),
                "seconds_collect": seconds_collect,
                "seconds_iteration": time.perf_counter() - t_prev,
                "seconds_total": time.perf_counter() - t0,
            })
            scalars.update(action_stats(data, space))
            loggers.log(scalars, it + 1)
            history.write(json.dumps({"iteration": it + 1, **scalars}) + "\n")
            history.flush()
            last = scalars
            if run.on_iteration is not None:
                run.on_iteration(it + 1, scalars)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(ret=f"{scalars['episode_return']:.3f}", acc=f"{scalars['final_val_accuracy']:.3f}",
                                ev=f"{scalars['explained_variance']:.2f}", ent=f"{scalars['entropy']:.2f}")
            if (it + 1) % config.checkpoint_every == 0 or it + 1 == iterations:
                _checkpoint(ckpts, it + 1, actor, critic, opt, shuffle, config, run.init_meta)
            t_prev = time.perf_counter()
    finally:
        collector.shutdown()
        loggers.close()
        history.close()
        if bar is not None:
            bar.close()
    weights = save_tamiyo(out / "tamiyo.safetensors", actor, critic,
                          metadata={**run.metadata, "ppo": json.loads(config.model_dump_json()),
                                    "iterations": iterations})
    plot_training(out)
    return {"iterations": iterations, "frames": iterations * N * T, "last": last, "weights": str(weights)}


def tamiyo_from_checkpoint(run_dir: str | Path, step: int | None = None, out: str | Path | None = None) -> Path:
    """Write the policy of a `train_ppo` checkpoint as a `save_tamiyo` weights file, e.g. an
    iteration chosen on selection seeds, or the last one of a run that was stopped.

    Args:
        run_dir: the training directory (its ``checkpoints/``).
        step: the iteration checkpointed (default: the latest).
        out: the file to write (default ``RUN_DIR/tamiyo_it<step>.safetensors``).

    Returns:
        The path written; its metadata records the run directory, the iteration, the PPO config
        and the warm start the run began from.

    Raises:
        CheckpointError: no such checkpoint, or it fails its verification.
        TamiyoError: the checkpoint is not a Tamiyo training checkpoint.
    """
    run_dir = Path(run_dir)
    tensors, meta = CheckpointManager(run_dir / "checkpoints").restore(step)
    if "tamiyo" not in meta or not any(k.startswith("model/") for k in tensors):
        raise TamiyoError(f"{run_dir}: checkpoint {step if step is not None else '(latest)'} is not a Tamiyo training "
                          "checkpoint (no policy weights); give the --out of an `esper-fn train-tamiyo` run.")
    actor, critic = rebuild_tamiyo(TamiyoConfig.model_validate(meta["tamiyo"]),
                                   {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")},
                                   where=str(run_dir / "checkpoints"))
    it = int(meta["iteration"])
    return save_tamiyo(out or run_dir / f"tamiyo_it{it}.safetensors", actor, critic,
                       metadata={"from_checkpoint": str(run_dir), "iterations": it, "ppo": meta["config"],
                                 "init": meta.get("init")})


_PPO_PANELS = (("episode_return", "episode return"), ("final_val_accuracy", "final validation accuracy"),
               ("explained_variance", "explained variance"), ("entropy", "policy entropy"),
               ("ops/germinate", "germinations per step"), ("final_param_ratio", "final params / host"))
_BC_PANELS = (("loss", "imitation loss"), ("value_loss", "critic warm-up loss"),
              ("holdout_accuracy", "held-out action accuracy"), ("holdout_growth_accuracy", "held-out growth-decision accuracy"))


def plot_training(out: str | Path) -> list[Path]:
    """Plot a Tamiyo training directory's curves: ``training.png`` from PPO's ``history.jsonl``
    (return, validation accuracy, explained variance, entropy, germination rate, parameters per
    iteration) and ``imitation.png`` from behaviour cloning's ``imitation.jsonl`` (losses and
    held-out accuracies per pass). Either file may be absent.

    Returns:
        The PNGs written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    written = []
    for log, x_key, panels, png, xlabel in (("history.jsonl", "iteration", _PPO_PANELS, "training.png", "PPO iteration"),
                                            ("imitation.jsonl", "epoch", _BC_PANELS, "imitation.png", "imitation pass")):
        if not (out / log).is_file():
            continue
        rows = [json.loads(line) for line in (out / log).read_text().splitlines() if line.strip()]
        if not rows:
            continue
        cols = 3 if len(panels) > 4 else 2
        rows_n = -(-len(panels) // cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(3.6 * cols, 2.6 * rows_n), squeeze=False)
        for ax, (key, title) in zip(axes.flat, panels):
            xs = [r[x_key] for r in rows if key in r]
            ys = [float(r[key]) for r in rows if key in r]
            ax.plot(xs, ys, marker="." if len(xs) < 40 else None, alpha=0.5 if len(xs) >= 10 else 1.0)
            if len(xs) >= 10:  # episodes draw different instances: the running mean shows the trend
                w = 5
                ax.plot(xs[w - 1:], [sum(ys[i - w + 1:i + 1]) / w for i in range(w - 1, len(ys))], color="C1",
                        label=f"mean of {w}")
                ax.legend(fontsize=7)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / png, dpi=100)
        plt.close(fig)
        written.append(out / png)
    return written


def _checkpoint(ckpts, it, actor, critic, opt, shuffle, config, init_meta=None) -> None:
    tensors = {f"model/{k}": v for k, v in tamiyo_tensors(actor, critic).items()}
    opt_t, opt_meta = _optimizer_tensors(opt)
    tensors.update(opt_t)
    tensors["rng/torch"] = torch.get_rng_state()
    tensors["rng/shuffle"] = shuffle.get_state()
    device = next(actor.parameters()).device
    if device.type == "cuda":  # actions are sampled on the device's generator
        tensors["rng/cuda"] = torch.cuda.get_rng_state(device)
    ckpts.save(it, tensors, {"iteration": it, "config": json.loads(config.model_dump_json()),
                             "optimizer": json.loads(json.dumps(opt_meta)),
                             "tamiyo": json.loads(actor.tamiyo_config.model_dump_json()),
                             "init": init_meta}, overwrite=True)

