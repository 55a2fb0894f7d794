"""Optimisers behind a registry: an ablation registers a builder and sets optim.name.

`OPTIMIZERS` is the one list of valid `optim.name` values: the planner (`testbed.plan`)
checks a config against it before any run starts. torch is imported inside the builders only,
so that check (and `testbed sweep plan`) does not load torch. An optimiser may own settings, as a
model part does: `OPTIMIZERS.register("sgd", options=SGDOptions)`, reached as optim.options.FIELD.

Registered: `adamw` (every parameter) and `muon` (Muon on the blocks' matrices, AdamW on the
embedding, the output head, gains and biases, as Moonlight does); docs/optimizers.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from testbed.config import ModelConfig, OptimConfig
from testbed.errors import ConfigError
from testbed.registry import Options, Registry

if TYPE_CHECKING:
    import torch
    from torch import nn

OPTIMIZERS = Registry("optimiser", "optim.name")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear and embedding weights); never decay gains or biases (nanoGPT).

    A module may carry `lr_scale`: its matrices then train at lr x lr_scale, in a group of their
    own that records it (µP sets 1/m on the blocks, testbed/model/transformer.py); the trainer sets
    each group's lr to the schedule's times the group's `lr_scale`. Weight decay keeps its
    coefficient in every decayed group: AdamW multiplies it by the group's lr, so µP's hidden
    matrices decay by lr / m x weight_decay per step (docs/mup.md).
    Without any `lr_scale` (SP) the groups are the two above, as they always were."""
    return _decay_groups(*_split(model), weight_decay)


def _split(model: nn.Module) -> tuple[list[tuple[nn.Parameter, float | None]], list[nn.Parameter]]:
    """The trainable parameters, each once and in module order: (matrix, its module's lr_scale)
    pairs, and the rest (gains, biases)."""
    matrices: list[tuple[nn.Parameter, float | None]] = []  # (weight, its module's lr_scale)
    no_decay: list[nn.Parameter] = []
    seen = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if p.dim() >= 2:
                matrices.append((p, getattr(module, "lr_scale", None)))
            else:
                no_decay.append(p)
    return matrices, no_decay


def _decay_groups(matrices: list[tuple[nn.Parameter, float | None]], no_decay: list[nn.Parameter],
                  weight_decay: float) -> list[dict]:
    """param_groups' groups: the matrices decayed (one group per lr_scale, when any is set), the
    rest not."""
    scaled = any(scale is not None for _, scale in matrices)
    return [*_matrix_groups(matrices, weight_decay),
            {"params": no_decay, "weight_decay": 0.0, **({"lr_scale": 1.0} if scaled else {})}]


def _matrix_groups(matrices: list[tuple[nn.Parameter, float | None]], weight_decay: float) -> list[dict]:
    """One decayed group of all the matrices when none has an lr_scale, else one per lr_scale
    recording it (a scale of 1 shares the unscaled matrices' group)."""
    if all(scale is None for _, scale in matrices):
        return [{"params": [p for p, _ in matrices], "weight_decay": weight_decay}]
    by_scale: dict[float, list[nn.Parameter]] = {}
    for p, scale in matrices:
        by_scale.setdefault(1.0 if scale is None else scale, []).append(p)
    return [{"params": params, "weight_decay": weight_decay, "lr_scale": scale}
            for scale, params in by_scale.items()]


@OPTIMIZERS.register("adamw")
def adamw(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    import torch

    # The fused kernel is one launch per step on CUDA; on CPU the default (foreach) path is used.
    fused = device.type == "cuda"
    groups = _scaled_lrs(param_groups(model, cfg.weight_decay), cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr,
                             betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps, fused=fused)


def _scaled_lrs(groups: list[dict], lr: float) -> list[dict]:
    """Each group with an lr_scale starts at lr x lr_scale (the trainer resets every lr each step)."""
    for group in groups:
        if "lr_scale" in group:
            group["lr"] = lr * group["lr_scale"]
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimiser `optim.name` names; one that registered `options=` (testbed.registry.Options)
    is also given `options=` its settings from optim.options."""
    return OPTIMIZERS.build(cfg.name, model, cfg, device, options=cfg.options, key="optim.options")


# ----------------------------------------------------------------------------- Muon

# Muon's update scale, optim.options.adjust_lr: the name is torch.optim.Muon's adjust_lr_fn.
ADJUST_LR = ("match_rms_adamw", "original")
# torch.optim.Muon's Newton-Schulz coefficients (a, b, c) and its norm floor, from Keller Jordan's Muon.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7
# What optim.options sets in a Muon group: restored from the config after a resume (the config
# wins, as the trainer does for betas and weight decay).
MUON_SETTINGS = ("momentum", "nesterov", "ns_steps", "adjust_lr_fn", "ns_coefficients", "eps")


@dataclass(frozen=True)
class MuonOptions(Options):
    """optim.options of `muon` (docs/optimizers.md)."""

    momentum: float = 0.95  # the momentum buffer's decay (torch: buf.lerp_(grad, 1 - momentum))
    nesterov: bool = True  # orthogonalise grad.lerp(buf, momentum) instead of buf
    ns_steps: int = 5  # Newton-Schulz iterations
    adjust_lr: str = "match_rms_adamw"  # match_rms_adamw: 0.2 sqrt(max(A, B)); original: sqrt(max(1, A/B))

    def check(self) -> None:
        self.require(isinstance(self.momentum, (int, float)) and 0.0 <= self.momentum < 1.0, "momentum", "set it in [0, 1), e.g. 0.95 (Muon's default)")
        self.require(isinstance(self.nesterov, bool), "nesterov", "set it to true or false")
        self.require(isinstance(self.ns_steps, int) and 1 <= self.ns_steps <= 20, "ns_steps",
                     "set it to a whole number of Newton-Schulz iterations from 1 to 20, e.g. 5")
        self.require(self.adjust_lr in ADJUST_LR, "adjust_lr",
                     "choose match_rms_adamw (Moonlight's 0.2 sqrt(max(A, B)): AdamW's lr and weight "
                     "decay carry over) or original (Keller Jordan's sqrt(max(1, A/B)))")


def _unwrapped(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", None)  # DDP keeps the model as .module
    return inner if inner is not None and hasattr(inner, "parameters") else model


def muon_param_groups(model: nn.Module, weight_decay: float) -> tuple[list[dict], list[dict]]:
    """(Muon's groups, AdamW's groups), as Moonlight splits them: Muon takes every 2-D matrix but
    the token embedding and the output head (tied or not), i.e. the blocks' matrices; AdamW takes
    the embedding and the head (decayed) and the gains and biases (not decayed), grouped as
    `param_groups` groups them. A matrix keeps its module's `lr_scale` (µP's 1/m) under Muon."""
    from torch import nn

    inner = _unwrapped(model)
    io: set[int] = set()
    for module in inner.modules():
        if isinstance(module, nn.Embedding):
            io.update(id(p) for p in module.parameters(recurse=False))
    for name in ("embed", "head"):
        part = getattr(inner, name, None)
        if isinstance(part, nn.Module):
            io.update(id(p) for p in part.parameters())
    matrices, rest = _split(model)
    hidden = [(p, s) for p, s in matrices if p.dim() == 2 and id(p) not in io]
    others = [(p, s) for p, s in matrices if not (p.dim() == 2 and id(p) not in io)]
    return _matrix_groups(hidden, weight_decay), _decay_groups(others, rest, weight_decay)


_MUON_CLASS: Any = None


def _muon_adamw_class() -> Any:
    """MuonAdamW, defined on first use so that importing this module does not import torch."""
    global _MUON_CLASS
    if _MUON_CLASS is not None:
        return _MUON_CLASS
    import torch

    class MuonAdamW(torch.optim.Optimizer):
        """One optimiser over two: a torch.optim.Muon and a torch.optim.AdamW that share this
        object's param_groups (Muon's first) and state, so that state_dict / load_state_dict
        (torch's own, index-keyed like any optimiser's), zero_grad and the trainer's per-group lr
        cover both."""

        def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW, settings: dict[str, Any]):
            self.muon, self.adamw, self.settings = muon, adamw, settings
            self.n_muon = len(muon.param_groups)
            super().__init__([*muon.param_groups, *adamw.param_groups], {})
            self._link()

        def _link(self) -> None:
            self.muon.param_groups = self.param_groups[:self.n_muon]
            self.adamw.param_groups = self.param_groups[self.n_muon:]
            self.muon.state = self.adamw.state = self.state

        @torch.no_grad()
        def step(self, closure: Any = None) -> Any:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self.muon.step()
            self.adamw.step()
            return loss

        def load_state_dict(self, state_dict: Any) -> None:
            # torch's load replaces the groups and the state with new objects: share them again,
            # and keep the config's Muon settings (JSON turned ns_coefficients into a list).
            super().load_state_dict(state_dict)
            self._link()
            for group in self.param_groups[:self.n_muon]:
                group.update(self.settings)

    _MUON_CLASS = MuonAdamW
    return MuonAdamW


@OPTIMIZERS.register("muon", options=MuonOptions)
def muon(model: nn.Module, cfg: OptimConfig, device: torch.device,
         options: MuonOptions = MuonOptions()) -> torch.optim.Optimizer:
    """Muon (Jordan et al. 2024) on the blocks' matrices, AdamW with the config's betas, eps and
    weight decay on the rest (Moonlight, Liu et al. 2025); both at optim.lr (x each group's
    lr_scale) and optim.weight_decay."""
    import torch

    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        raise ConfigError("optim.name='muon' needs whole matrices for its Newton-Schulz step, but the "
                          "parameters are sharded (train.parallel=fsdp); use train.parallel=ddp or optim.name=adamw")
    hidden, others = muon_param_groups(model, cfg.weight_decay)
    settings = {"momentum": options.momentum, "nesterov": options.nesterov, "ns_steps": options.ns_steps,
                "adjust_lr_fn": options.adjust_lr, "ns_coefficients": NS_COEFFICIENTS, "eps": NS_EPS}
    muon_opt = torch.optim.Muon(_scaled_lrs(hidden or [{"params": []}], cfg.lr), lr=cfg.lr,
                                weight_decay=cfg.weight_decay, **settings)
    adamw_opt = torch.optim.AdamW(_scaled_lrs(others, cfg.lr), lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]),
                                  eps=cfg.eps, fused=device.type == "cuda")
    return _muon_adamw_class()(muon_opt, adamw_opt, settings)


def newton_schulz_flops(shapes: list[tuple[int, int]], ns_steps: int = 5) -> int:
    """Matmul FLOPs of Muon's Newton-Schulz iterations in one optimiser step, for matrices of these
    shapes. torch orthogonalises an A x B matrix as X, m x n with m = min(A, B) <= n = max(A, B)
    (transposed if need be), and each iteration does
        A = X X^T       2 m^2 n
        B = b A + c A^2 2 m^3   (A^2; the scaled sum, O(m^2), is not counted)
        X = a X + B X   2 m^2 n (the scaled sum, O(mn), is not counted)
    so 4 m^2 n + 2 m^3 per iteration. The momentum, the normalisation and the update (O(mn) each)
    are not counted either."""
    total = 0
    for a, b in shapes:
        m, n = min(a, b), max(a, b)
        total += ns_steps * (4 * m * m * n + 2 * m ** 3)
    return total


def muon_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """The shapes of the matrices Muon updates in `model` (muon_param_groups)."""
    hidden, _ = muon_param_groups(model, 0.0)
    return [(int(p.shape[0]), int(p.shape[1])) for group in hidden for p in group["params"]]


def muon_flops_per_step(cfg: ModelConfig, ns_steps: int = 5) -> int:
    """newton_schulz_flops for the model `cfg` describes (built on the meta device: no memory).
    Every data-parallel process runs them all, on its own copy of the matrices."""
    import torch

    from testbed.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    return newton_schulz_flops(muon_shapes(model), ns_steps)


def muon_overhead(cfg: ModelConfig, seq_len: int, global_batch_tokens: int, ns_steps: int = 5) -> float:
    """Muon's Newton-Schulz FLOPs per step over the training FLOPs per step as the run counts
    them (testbed.model.counting.flops_per_token x global_batch_tokens; run.json's flops
    exclude Newton-Schulz)."""
    from testbed.model.counting import flops_per_token

    return muon_flops_per_step(cfg, ns_steps) / (flops_per_token(cfg, seq_len) * global_batch_tokens)
