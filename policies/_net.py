"""Tamiyo's networks: a GATv2 encoder over the env's padded layer/slot graph, and the heads that map
its node and graph embeddings onto the env's flat action space.

Dense tensors come in (``node_features [*B, L, F]``, ``node_mask``, ``edge_index [*B, 2, E]``,
``edge_mask``, ...); the torch_geometric batch is built inside `TamiyoTrunk.forward` (BenchMARL's
``_batch_from_dense_to_ptg`` pattern) and nothing from torch_geometric leaves the module. Every
head is per slot (or per (slot, blueprint, tempo)), so the weights do not depend on the number of
slots: one network runs on hosts with different slot counts, the env's padding and action mask
doing the rest.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

with warnings.catch_warnings():
    # torch_geometric 2.8 calls the deprecated torch.jit.script at import time (its pooling
    # modules); that is the library's business, not a problem in this code.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=DeprecationWarning)
    from torch_geometric.data import Batch
    from torch_geometric.nn import GATv2Conv

__all__ = ["TamiyoHead", "TamiyoTrunk", "ValueReduce", "dense_to_pyg"]


def _mlp(d_in: int, d_hidden: int, d_out: int, dropout: float = 0.0) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.ELU(), nn.Dropout(dropout), nn.Linear(d_hidden, d_out))


def dense_to_pyg(x: Tensor, node_mask: Tensor, edge_index: Tensor, edge_mask: Tensor) -> Batch:
    """One torch_geometric `Batch` from padded dense graphs.

    Args:
        x: float [M, L, H] node embeddings of M graphs padded to L nodes.
        node_mask: bool [M, L], real nodes.
        edge_index: int64 [M, 2, E] per-graph (src, dst) node indices, padded.
        edge_mask: bool [M, E], real edges (they must join real nodes).

    Returns:
        A `Batch` with ``x`` [n, H] (real nodes only, graph by graph), ``edge_index`` [2, e] into
        them, and ``batch`` [n] (the graph of each node).
    """
    M, L, H = x.shape
    flat = node_mask.reshape(M * L)
    new_id = torch.cumsum(flat.long(), 0) - 1  # position of each real node in the packed batch
    offset = (torch.arange(M, device=x.device) * L).view(M, 1, 1)
    ei = (edge_index + offset).permute(1, 0, 2).reshape(2, -1)[:, edge_mask.reshape(-1)]
    batch = torch.arange(M, device=x.device).repeat_interleave(L)[flat]
    return Batch(x=x.reshape(M * L, H)[flat], edge_index=new_id[ei], batch=batch)


class TamiyoTrunk(nn.Module):
    """GATv2 encoder shared by actor and critic.

    Args:
        node_dim: F, features per graph node.
        global_dim: G, global features.
        num_blueprints: B; slot blueprints are embedded from ``B + 1`` ids (``B`` = none).
        hidden: H, embedding width.
        heads: attention heads per GATv2 layer (H must be divisible by it).
        layers: GATv2 layers (each residual, with LayerNorm).
        value_heads: K value heads (the ensemble whose spread is the uncertainty).
        dropout: dropout in the MLPs.
        instance_dim: I, instance features read beside the globals (``"instance"``; 0: none).

    Forward inputs (``*B`` any batch dims, including none):
        node_features f32 [*B, L, F], node_mask bool [*B, L], node_slot int64 [*B, L] (slot index of
        a slot node, -1 otherwise), edge_index int64 [*B, 2, E], edge_mask bool [*B, E],
        global_features f32 [*B, G], slot_mask bool [*B, S], slot_blueprint int64 [*B, S], and with
        ``instance_dim`` instance f32 [*B, I].

    Returns:
        graph f32 [*B, H] (pooled nodes + globals), slots f32 [*B, S, H] (one embedding per slot, with
        graph context), value_ensemble f32 [*B, K].
    """

    def __init__(self, node_dim: int, global_dim: int, num_blueprints: int, *, hidden: int = 64, heads: int = 4,
                 layers: int = 2, value_heads: int = 5, dropout: float = 0.0, instance_dim: int = 0):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads}).")
        self.node_in = _mlp(node_dim, hidden, hidden, dropout)
        self.convs = nn.ModuleList(GATv2Conv(hidden, hidden // heads, heads=heads, add_self_loops=True)
                                   for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        self.instance_dim = instance_dim
        self.global_in = _mlp(global_dim + instance_dim, hidden, hidden, dropout)
        self.graph_out = _mlp(3 * hidden, hidden, hidden, dropout)
        self.seed_blueprint = nn.Embedding(num_blueprints + 1, hidden)
        self.slot_out = _mlp(3 * hidden, hidden, hidden, dropout)
        self.values = nn.ModuleList(_mlp(hidden, hidden, 1) for _ in range(value_heads))

    def forward(self, node_features: Tensor, node_mask: Tensor, node_slot: Tensor, edge_index: Tensor,
                edge_mask: Tensor, global_features: Tensor, slot_mask: Tensor,
                slot_blueprint: Tensor, instance: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        lead = node_features.shape[:-2]
        L, S = node_features.shape[-2], slot_mask.shape[-1]
        M = int(torch.Size(lead).numel())
        x = self.node_in(node_features.reshape(M, L, -1))
        mask = node_mask.reshape(M, L)
        pyg = dense_to_pyg(x, mask, edge_index.reshape(M, 2, -1), edge_mask.reshape(M, -1))
        h = pyg.x
        for conv, norm in zip(self.convs, self.norms):
            h = norm(h + nn.functional.elu(conv(h, pyg.edge_index)))
        dense = x.new_zeros(M * L, x.shape[-1])
        dense[mask.reshape(-1)] = h
        dense = dense.view(M, L, -1)
        m = mask.unsqueeze(-1).to(dense.dtype)
        mean = (dense * m).sum(1) / m.sum(1).clamp_min(1.0)
        mx = dense.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        glob = global_features.reshape(M, -1)
        if self.instance_dim:
            glob = torch.cat([glob, instance.reshape(M, -1)], -1)
        g = self.global_in(glob)
        graph = self.graph_out(torch.cat([mean, mx, g], -1))
        # Slot nodes -> per-slot rows: a one-hot matmul keeps shapes static.
        onehot = (node_slot.reshape(M, L, 1) == torch.arange(S, device=x.device)).to(dense.dtype)
        slot_nodes = onehot.transpose(1, 2) @ dense  # [M, S, H]
        seed = self.seed_blueprint(slot_blueprint.reshape(M, S))
        slots = self.slot_out(torch.cat([slot_nodes, seed, graph.unsqueeze(1).expand(M, S, -1)], -1))
        slots = slots * slot_mask.reshape(M, S, 1).to(slots.dtype)
        values = torch.cat([v(graph) for v in self.values], -1)
        return graph.reshape(*lead, -1), slots.reshape(*lead, S, -1), values.reshape(*lead, -1)


class TamiyoHead(nn.Module):
    """Policy and safety head: logits and harm logits over the flat action space.

    WAIT reads the graph embedding; GERMINATE (s, b, t) reads ``tanh(W z_s + e_b + e_t)`` (slot
    embedding, learned blueprint and tempo embeddings); ADVANCE, FOSSILIZE and PRUNE read the slot
    embedding. Each action gets two numbers: its logit and its harm logit (the safety head, trained
    as an auxiliary to predict rollbacks and negative contributions).

    Args:
        hidden: H.
        num_blueprints: B.
        num_tempos: T.
        safety_bias: at decision time subtract ``safety_bias * P(harm)`` from every non-WAIT logit
            (0, the default, leaves the policy untouched).
        uncertainty_bias: add ``uncertainty_bias * value_std`` to the WAIT logit (0 by default).

    Forward inputs: graph [*B, H], slots [*B, S, H], value_ensemble [*B, K].

    Returns:
        logits f32 [*B, A], harm_logits f32 [*B, A], value_uncertainty f32 [*B, 1] (the ensemble's
        standard deviation), with ``A = 1 + S*B*T + 3*S``.
    """

    def __init__(self, hidden: int, num_blueprints: int, num_tempos: int, *, safety_bias: float = 0.0,
                 uncertainty_bias: float = 0.0):
        super().__init__()
        self.num_blueprints, self.num_tempos = num_blueprints, num_tempos
        self.safety_bias, self.uncertainty_bias = float(safety_bias), float(uncertainty_bias)
        self.wait = _mlp(hidden, hidden, 2)
        self.germ_slot = nn.Linear(hidden, hidden)
        self.blueprint = nn.Embedding(num_blueprints, hidden)
        self.tempo = nn.Embedding(num_tempos, hidden)
        self.germ_out = nn.Linear(hidden, 2)
        self.slot_ops = _mlp(hidden, hidden, 6)

    def forward(self, graph: Tensor, slots: Tensor, value_ensemble: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        lead, S = slots.shape[:-2], slots.shape[-2]
        B, T = self.num_blueprints, self.num_tempos
        wait = self.wait(graph)  # [*, 2]
        z = self.germ_slot(slots)[..., :, None, None, :]  # [*, S, 1, 1, H]
        germ = self.germ_out(torch.tanh(z + self.blueprint.weight[:, None, :] + self.tempo.weight[None, :, :]))
        # The logits follow esper_fn.actions.ActionSpace: WAIT, GERMINATE row-major over (s, b, t), then
        # ADVANCE, FOSSILIZE, PRUNE per slot.
        germ = germ.reshape(*lead, S * B * T, 2)
        ops = self.slot_ops(slots).reshape(*lead, S, 3, 2).transpose(-3, -2).reshape(*lead, 3 * S, 2)
        both = torch.cat([wait.unsqueeze(-2), germ, ops], -2)  # [*, A, 2]
        logits, harm = both[..., 0], both[..., 1]
        std = value_ensemble.std(-1, keepdim=True) if value_ensemble.shape[-1] > 1 else value_ensemble * 0
        if self.safety_bias:
            risk = torch.sigmoid(harm.detach())
            risk = torch.cat([torch.zeros_like(risk[..., :1]), risk[..., 1:]], -1)
            logits = logits - self.safety_bias * risk
        if self.uncertainty_bias:
            bump = torch.zeros_like(logits)
            bump[..., 0] = self.uncertainty_bias * std.detach().squeeze(-1)
            logits = logits + bump
        return logits, harm, std


class ValueReduce(nn.Module):
    """Critic output from the value ensemble: mean (the value) and standard deviation."""

    def forward(self, value_ensemble: Tensor) -> tuple[Tensor, Tensor]:
        std = value_ensemble.std(-1, keepdim=True) if value_ensemble.shape[-1] > 1 else value_ensemble * 0
        return value_ensemble.mean(-1, keepdim=True), std
