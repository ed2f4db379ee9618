"""Encoders and the BP regression model: ECGFounder's Net1D, the fusion variants, the
bounded head, and loading pre-trained weights with a report.

Net1D
    A re-implementation of PKUDigitalHealth/ECGFounder's ``net1d.Net1D`` with the same
    state_dict names and numbers (pinned by ``tests/data/net1d_tiny_*``). Details that
    matter for the published weights:
    - "same" padding of every conv: ``out = ceil(L / stride)``, the total padding
      ``max(0, (out - 1) * stride + kernel - L)`` split ``p // 2`` left, rest right, zeros;
    - the shortcut max-pool pads ``kernel - 1`` zeros whatever the length (zeros, not
      ``-inf``, so a negative last sample of an odd-length map becomes 0), then pools with
      stride = kernel; extra channels of the shortcut are zeros split half below, half above;
    - the first conv always has stride 2, whatever ``stride`` says;
    - BatchNorms exist in the state_dict but are applied only when ``use_bn`` (the published
      model has ``use_bn=False``), and the first block of the first stage never applies its
      ``bn1``/activation/dropout; those unused norms get ``requires_grad=False`` so that
      optimisers and DDP never see parameters without gradients;
    - dropout (p=0.5) only when ``use_do``; Swish = SiLU; squeeze-excitation with ratio 2.
    ``ARCHS`` holds encoder configs (``n_classes=0``: no ``dense``); ``Net1D(ARCHS[
    "ecgfounder"], n_classes=150)`` is the published classifier, key for key.

BPModel (``build_bp_model``)
    One Net1D per modality in use (``encoders["ecg"]``, ``encoders["ppg"]``), or for
    ``fusion="early"`` one two-channel Net1D (``encoders["both"]``), or none for
    ``modality="none"`` (covariates only: the head alone). Fusion of ECG+PPG:
    - ``late``: each encoder pooled over time, the pooled features concatenated;
    - ``mid``: the two time-resolved maps concatenated and passed through a small temporal
      conv block (``fusion``), whose pooled output joins the late features, so the model
      can see the ECG-to-PPG timing (pulse arrival time) and starts no worse than ``late``;
    - ``early``: one Net1D reads both channels from the first conv on.
    The head (LayerNorm of the pooled features, the ``n_covariates`` encoded covariates
    appended, MLP, last layer zero-initialised so training starts at the train mean) works
    in normalised target units. ``--constrain`` bounds every output to
    ``[y_lo, y_hi]`` (buffers, normalised units, set with ``set_bounds``):
    - ``clip``: hard clamp forward, straight-through gradient (identity), so an output
      pinned at a bound still moves when the loss pulls it back inside;
    - ``sigmoid``/``tanh``: smooth maps onto ``[lo, hi]``, shifted so a raw 0 gives 0, plus
      a gradient floor (``GRAD_FLOOR * (hi - lo)`` per unit of raw output, forward value
      unchanged) so a saturated output is never stuck with a zero gradient.

Pre-trained files (``load_pretrained``)
    Read with ``utils.load_checkpoint`` (weights-only unless the user trusts the file).
    The state_dict is taken from the ``state_dict``, ``model`` or ``model_state_dict`` entry,
    or is the file itself; leading ``module.`` / ``_orig_mod.`` (DDP, torch.compile) are
    stripped and ``dense.*`` (the 150-class classifier) is dropped. Its keys are then one of:
    - plain Net1D keys (``first_conv...``, ``stage_list...``): loaded into every encoder;
    - ``ecg.<net1d key>`` / ``ppg.<net1d key>`` (``both.`` for an early-fusion encoder): a
      joint file of separately trained encoders, each loaded into the encoder of that name;
    - ``encoders.<name>.<net1d key>``: this project's ``bp_best.pth`` (``model`` entry);
      its head is loaded too when its ``target_cols`` and covariate columns equal the
      caller's and every head tensor fits.
    The early-fusion encoder ``both`` takes a plain or ``ecg`` source; its first conv is
    widened to two input channels: the ECG slice from the file, the PPG slice zeros, so it
    starts as exactly the pre-trained ECG encoder. That widened weight is new, so it
    trains at the head's learning rate and stays trainable under ``freeze_backbone``.
    Any encoder in use that would load nothing, miss a tensor (a BatchNorm's unused
    ``num_batches_tracked`` excepted), receive an unexpected one or a shape that does not
    fit raises ``UserError`` before anything is loaded: never train as if pre-trained.
    A project file's ``y_lo``/``y_hi`` are not loaded: the bounds belong to the new run.
    A file that records ``encoder_settings`` (pretrain_ssl.py's ssl_encoders.pth, joint
    layout) must have been trained with this model's arch and encoders (late and mid fusion
    share theirs); otherwise a ``UserError`` names both settings.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dataset import covariate_names
from utils import UserError, load_checkpoint

# "none": a covariates-only model (no encoder), the signal-free reference
MODALITY_CHANNELS: Dict[str, Tuple[int, ...]] = {"ecg": (0,), "ppg": (1,), "both": (0, 1),
                                                 "none": ()}
FUSIONS = ("late", "mid", "early")
# The synthetic pulse-arrival-time prototype: one encoder over both channels reached
# 2.71 mmHg MAE where late fusion stayed at the train-mean baseline (10.8).
DEFAULT_FUSION = "early"
CONSTRAINTS = ("none", "clip", "sigmoid", "tanh")
GRAD_FLOOR = 0.01
WIDENED_KEY = "first_conv.conv.weight"


# ----------------------------------------------------------------------------- Net1D
@dataclass
class Net1DConfig:
    """ECGFounder's Net1D arguments; the defaults are the published encoder (no dense)."""
    in_channels: int = 1
    base_filters: int = 64
    ratio: float = 1
    filter_list: List[int] = field(default_factory=lambda: [64, 160, 160, 400, 400, 1024, 1024])
    m_blocks_list: List[int] = field(default_factory=lambda: [2, 2, 2, 3, 3, 4, 4])
    kernel_size: int = 16
    stride: int = 2
    groups_width: int = 16
    n_classes: int = 0
    use_bn: bool = False
    use_do: bool = False

    def validate(self) -> "Net1DConfig":
        """Raise ``UserError`` for a config Net1D cannot be built from; return self."""
        ints = (self.in_channels, self.base_filters, self.kernel_size, self.stride,
                self.groups_width, *self.filter_list, *self.m_blocks_list)
        if min(ints) < 1 or self.n_classes < 0 or self.ratio <= 0:
            raise UserError(f"Net1D config {self}: sizes must be positive")
        if not self.filter_list or len(self.filter_list) != len(self.m_blocks_list):
            raise UserError(f"Net1D config {self}: filter_list and m_blocks_list must be "
                            f"non-empty and of equal length")
        for width in self.filter_list:
            groups = width // self.groups_width
            if groups < 1 or width % self.groups_width or int(width * self.ratio) % groups:
                raise UserError(f"Net1D config {self}: filter {width} does not split into "
                                f"groups of width {self.groups_width}")
        return self


ARCHS: Dict[str, Net1DConfig] = {
    "tiny": Net1DConfig(base_filters=8, filter_list=[8, 16, 16, 24], m_blocks_list=[2, 1, 2, 1],
                        groups_width=4),
    # same depth and 256x downsampling as ecgfounder, for CPU demos and fusion studies
    "small": Net1DConfig(base_filters=16, filter_list=[16, 32, 32, 64, 64, 128, 128],
                         m_blocks_list=[1, 1, 1, 1, 1, 1, 1], groups_width=8),
    "base": Net1DConfig(base_filters=32, filter_list=[32, 64, 64, 128, 128, 256, 256],
                        m_blocks_list=[1, 1, 1, 2, 2, 2, 2], groups_width=16),
    "ecgfounder": Net1DConfig(),
}


def _same_pad(length: int, kernel: int, stride: int) -> Tuple[int, int]:
    out = -(-length // stride)
    total = max(0, (out - 1) * stride + kernel - length)
    return total // 2, total - total // 2


class SamePadConv1d(nn.Module):
    """ECGFounder's ``MyConv1dPadSame``: Conv1d (kept as ``.conv``) with "same" padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride,
                              groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = _same_pad(x.shape[-1], self.conv.kernel_size[0], self.conv.stride[0])
        return self.conv(F.pad(x, pad) if any(pad) else x)


def max_pool_same(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """ECGFounder's ``MyMaxPool1dPadSame``: ``kernel - 1`` zeros of padding, stride = kernel."""
    if kernel == 1:
        return x
    total = kernel - 1
    return F.max_pool1d(F.pad(x, (total // 2, total - total // 2)), kernel)


class BasicBlock(nn.Module):
    """Pre-activation bottleneck: 1x1 conv, grouped kxk conv, 1x1 conv, SE, shortcut."""

    def __init__(self, in_channels: int, out_channels: int, cfg: Net1DConfig, groups: int,
                 downsample: bool, is_first_block: bool):
        super().__init__()
        middle = int(out_channels * cfg.ratio)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.use_bn, self.use_do, self.is_first_block = cfg.use_bn, cfg.use_do, is_first_block
        self.pool = cfg.stride if downsample else 1
        self.bn1 = nn.BatchNorm1d(in_channels)
        self.conv1 = SamePadConv1d(in_channels, middle, 1)
        self.bn2 = nn.BatchNorm1d(middle)
        self.conv2 = SamePadConv1d(middle, middle, cfg.kernel_size, self.pool, groups)
        self.bn3 = nn.BatchNorm1d(middle)
        self.conv3 = SamePadConv1d(middle, out_channels, 1)
        self.se_fc1 = nn.Linear(out_channels, out_channels // 2)
        self.se_fc2 = nn.Linear(out_channels // 2, out_channels)

    def _pre(self, x: torch.Tensor, bn: nn.BatchNorm1d) -> torch.Tensor:
        if self.use_bn:
            x = bn(x)
        x = F.silu(x)
        return F.dropout(x, 0.5, self.training) if self.use_do else x

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        x = max_pool_same(x, self.pool)
        extra = self.out_channels - self.in_channels
        return F.pad(x, (0, 0, extra // 2, extra - extra // 2)) if extra else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x if self.is_first_block else self._pre(x, self.bn1))
        out = self.conv2(self._pre(out, self.bn2))
        out = self.conv3(self._pre(out, self.bn3))
        se = torch.sigmoid(self.se_fc2(F.silu(self.se_fc1(out.mean(-1)))))
        return out * se.unsqueeze(-1) + self._shortcut(x)

    def unused_norms(self) -> List[nn.BatchNorm1d]:
        """The BatchNorms this block never applies (all of them when ``use_bn`` is off)."""
        if not self.use_bn:
            return [self.bn1, self.bn2, self.bn3]
        return [self.bn1] if self.is_first_block else []


class BasicStage(nn.Module):
    """``m_blocks`` blocks; the first downsamples by ``stride`` and changes the width."""

    def __init__(self, in_channels: int, out_channels: int, cfg: Net1DConfig, i_stage: int,
                 m_blocks: int):
        super().__init__()
        groups = out_channels // cfg.groups_width
        self.block_list = nn.ModuleList(
            BasicBlock(in_channels if i == 0 else out_channels, out_channels, cfg, groups,
                       downsample=i == 0, is_first_block=i_stage == 0 and i == 0)
            for i in range(m_blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block_list:
            x = block(x)
        return x


class Net1D(nn.Module):
    """ECGFounder's Net1D, state_dict-exact. ``Net1D(cfg)``, ``Net1D(**ecgfounder_kwargs)``
    or both (keywords override ``cfg``). ``forward`` gives logits when ``n_classes`` > 0,
    else the pooled features."""

    def __init__(self, cfg: Optional[Net1DConfig] = None, **overrides):
        super().__init__()
        cfg = dataclasses.replace(cfg or Net1DConfig(), **overrides).validate()
        self.config = cfg
        self.use_bn = cfg.use_bn
        # ECGFounder's first conv has stride 2 whatever `stride` says
        self.first_conv = SamePadConv1d(cfg.in_channels, cfg.base_filters, cfg.kernel_size, 2)
        self.first_bn = nn.BatchNorm1d(cfg.base_filters)
        widths = [cfg.base_filters] + list(cfg.filter_list)
        self.stage_list = nn.ModuleList(
            BasicStage(widths[i], widths[i + 1], cfg, i, m)
            for i, m in enumerate(cfg.m_blocks_list))
        if cfg.n_classes:
            self.dense = nn.Linear(widths[-1], cfg.n_classes)
        for norm in self._unused_norms():
            norm.requires_grad_(False)

    @property
    def out_channels(self) -> int:
        return self.config.filter_list[-1]

    def _unused_norms(self) -> List[nn.BatchNorm1d]:
        unused = [] if self.use_bn else [self.first_bn]
        for stage in self.stage_list:
            for block in stage.block_list:
                unused += block.unused_norms()
        return unused

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, L) -> (B, F, L') before pooling; L' = ceil(L / 2^(1 + n_stages)) for stride 2."""
        out = self.first_conv(x)
        if self.use_bn:
            out = self.first_bn(out)
        out = F.silu(out)
        for stage in self.stage_list:
            out = stage(out)
        return out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, L) -> (B, F): the feature map averaged over time (ECGFounder's features)."""
        return self.feature_map(x).mean(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.features(x)
        return self.dense(feats) if self.config.n_classes else feats


# ----------------------------------------------------------------------------- BP model
@dataclass
class BPModelConfig:
    """Everything needed to rebuild a ``BPModel``; stored as a dict in checkpoints.

    ``net1d`` is filled from ``ARCHS[arch]`` at build time so that a checkpoint rebuilds
    even if the named config changes later. ``fusion`` is ``"none"`` for one modality.
    ``fusion_channels`` (mid fusion's width) 0 means min(256, encoder width).
    ``covariate_offset``: the output adds a fixed linear function of the covariates (the
    train-fitted ridge regression, ``BPModel.set_covariate_offset``), so the network learns
    the residual and, its last layer starting at zero, starts as that ridge.
    """
    arch: str = "ecgfounder"
    modality: str = "both"
    fusion: str = DEFAULT_FUSION
    n_targets: int = 1
    constrain: str = "none"
    head_hidden: int = 256
    dropout: float = 0.1
    n_covariates: int = 0
    fusion_channels: int = 0
    net1d: Optional[dict] = None
    covariate_offset: bool = False


def _choice(value: str, choices: Sequence[str], what: str) -> str:
    if value not in choices:
        raise UserError(f"{what} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _from_dict(cls, values: Mapping):
    """``cls(**values)``, with a ``UserError`` for fields ``cls`` does not have."""
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise UserError(f"{cls.__name__} has no field(s) {', '.join(sorted(unknown))}")
    return cls(**values)


def normalise_config(cfg: Union[BPModelConfig, Mapping]) -> BPModelConfig:
    """Validate ``cfg`` (a dataclass or a checkpoint's dict) and fill ``fusion``/``net1d``."""
    if not isinstance(cfg, BPModelConfig):
        cfg = _from_dict(BPModelConfig, cfg)
    _choice(cfg.modality, tuple(MODALITY_CHANNELS), "--modality")
    _choice(cfg.constrain, CONSTRAINTS, "--constrain")
    fusion = _choice(cfg.fusion, FUSIONS, "--fusion") if cfg.modality == "both" else "none"
    if cfg.modality == "none" and cfg.n_covariates < 1:
        raise UserError("--modality none is a covariates-only model: give --covariates")
    if cfg.covariate_offset and cfg.n_covariates < 1:
        raise UserError("a covariate offset (the ridge floor) needs covariates")
    if cfg.net1d is None:
        net1d = dataclasses.asdict(ARCHS[_choice(cfg.arch, tuple(ARCHS), "--arch")])
    else:
        net1d = dict(cfg.net1d)
    width = _from_dict(Net1DConfig, net1d).validate().filter_list[-1]
    if cfg.n_targets < 1 or min(cfg.head_hidden, cfg.n_covariates, cfg.fusion_channels) < 0:
        raise UserError(f"model config {cfg}: n_targets must be >= 1, head_hidden, "
                        f"n_covariates and fusion_channels >= 0")
    if not 0.0 <= cfg.dropout < 1.0:
        raise UserError(f"dropout must be in [0, 1), got {cfg.dropout}")
    return dataclasses.replace(cfg, fusion=fusion, net1d=net1d,
                               fusion_channels=cfg.fusion_channels or min(256, width))


def encoder_names(modality: str, fusion: str) -> Tuple[str, ...]:
    """The encoders a model of ``modality`` and ``fusion`` holds (late and mid share theirs)."""
    if modality == "both":
        return ("both",) if fusion == "early" else ("ecg", "ppg")
    return () if modality == "none" else (modality,)


class TemporalFusion(nn.Module):
    """Mid fusion: 1x1 conv mixing the concatenated ECG/PPG maps, then a k=5 conv in time."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.mix = nn.Conv1d(in_channels, channels, 1)
        self.temporal = nn.Conv1d(channels, channels, 5, padding=2)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return F.silu(self.temporal(F.silu(self.mix(maps))))


class RegressionHead(nn.Module):
    """LayerNorm over pooled features, covariates appended, MLP; output starts at 0."""

    def __init__(self, in_features: int, n_covariates: int, hidden: int, n_targets: int,
                 dropout: float):
        super().__init__()
        # a covariates-only model has no pooled features to normalise
        self.norm = nn.LayerNorm(in_features) if in_features else nn.Identity()
        width = in_features + n_covariates
        layers: List[nn.Module] = []
        if hidden:
            layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, n_targets))
        self.mlp = nn.Sequential(*layers)
        # zero output at start = the train mean in normalised units
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, pooled: torch.Tensor, cov: Optional[torch.Tensor]) -> torch.Tensor:
        z = self.norm(pooled)
        if cov is not None:
            z = torch.cat([z, cov.to(z.dtype)], dim=1)
        return self.mlp(z)


def _bound_weight(raw: torch.Tensor, frac: torch.Tensor, mode: str) -> torch.Tensor:
    """Position in [0, 1] of the bounded output; ``frac`` where a raw 0 lands."""
    if mode == "sigmoid":
        return torch.sigmoid(raw + torch.logit(frac))
    return (torch.tanh(raw + torch.atanh(2 * frac - 1)) + 1) / 2


def bound_output(raw: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                 mode: str) -> torch.Tensor:
    """Map raw head outputs (B, T) into [lo, hi] per target; see the module docstring."""
    if mode == "none":
        return raw
    if mode == "clip":
        return raw + (torch.minimum(torch.maximum(raw, lo), hi) - raw).detach()
    span = hi - lo
    frac = (-lo / span).clamp(1e-4, 1 - 1e-4)
    # minus the weight at raw = 0, so a zero raw output is exactly 0 (the train mean)
    at_zero = _bound_weight(torch.zeros_like(lo), frac, mode)
    moved = span * (_bound_weight(raw, frac, mode) - at_zero)
    bounded = torch.minimum(torch.maximum(moved, lo), hi)  # rounding must not pass a bound
    return bounded + GRAD_FLOOR * span * (raw - raw.detach())


class BPModel(nn.Module):
    """Encoders (``encoders``), optional mid-fusion block (``fusion``), head (``head``).

    forward(x (B, C, L), cov (B, n_covariates) or None) -> (B, n_targets), normalised units,
    with C = ``len(MODALITY_CHANNELS[modality])`` (ECG first).
    """

    def __init__(self, cfg: BPModelConfig):
        super().__init__()
        self.config = cfg
        names = encoder_names(cfg.modality, cfg.fusion)
        enc_cfg = dataclasses.replace(Net1DConfig(**cfg.net1d), n_classes=0,
                                      in_channels=2 if cfg.fusion == "early" else 1)
        self.encoders = nn.ModuleDict({n: Net1D(enc_cfg) for n in names})
        width = enc_cfg.filter_list[-1]
        n_features = width * len(names)
        if cfg.fusion == "mid":
            self.fusion = TemporalFusion(2 * width, cfg.fusion_channels)
            n_features += cfg.fusion_channels
        self.head = RegressionHead(n_features, cfg.n_covariates, cfg.head_hidden,
                                   cfg.n_targets, cfg.dropout)
        # NaN until set_bounds (or a checkpoint) provides them; checked on first use
        self.register_buffer("y_lo", torch.full((cfg.n_targets,), math.nan))
        self.register_buffer("y_hi", torch.full((cfg.n_targets,), math.nan))
        if cfg.covariate_offset:  # zero until set_covariate_offset (or a checkpoint)
            self.register_buffer("offset_weight", torch.zeros(cfg.n_targets, cfg.n_covariates))
            self.register_buffer("offset_bias", torch.zeros(cfg.n_targets))
        self._bounds_ok = False
        self._frozen = False
        self.partly_new = {f"encoders.both.{WIDENED_KEY}"} if cfg.fusion == "early" else set()

    # ------------------------------------------------------------------ set-up
    def set_bounds(self, lo: Sequence[float], hi: Sequence[float]) -> None:
        """Per-target output bounds for ``constrain``, in normalised target units."""
        lo_t = torch.as_tensor(lo, dtype=torch.float32).reshape(-1)
        hi_t = torch.as_tensor(hi, dtype=torch.float32).reshape(-1)
        n = self.config.n_targets
        if lo_t.numel() != n or hi_t.numel() != n:
            raise ValueError(f"set_bounds needs {n} values each, "
                             f"got {lo_t.numel()} and {hi_t.numel()}")
        bad = ~(torch.isfinite(lo_t) & torch.isfinite(hi_t) & (lo_t < hi_t))
        if bad.any():
            k = int(bad.nonzero()[0])
            raise UserError(f"output bounds need finite lo < hi for every target; target "
                            f"index {k} has [{float(lo_t[k]):g}, {float(hi_t[k]):g}]")
        self.y_lo.copy_(lo_t)
        self.y_hi.copy_(hi_t)
        self._bounds_ok = True

    def set_covariate_offset(self, weight: np.ndarray, bias: np.ndarray) -> None:
        """The fixed linear function of the covariates added to the output, (T, K) and
        (T,), in normalised target units (``covariate_offset`` configs only)."""
        self.offset_weight.copy_(torch.as_tensor(np.asarray(weight), dtype=torch.float32))
        self.offset_bias.copy_(torch.as_tensor(np.asarray(bias), dtype=torch.float32))

    def is_pretrained(self, name: str) -> bool:
        """Whether parameter ``name`` is loaded unchanged from a pre-trained file."""
        return name.startswith("encoders.") and name not in self.partly_new

    def freeze_backbone(self) -> None:
        """Pre-trained parameters stop training; encoders stay in eval mode from now on."""
        for name, param in self.named_parameters():
            if self.is_pretrained(name):
                param.requires_grad_(False)
        self._frozen = True
        self.train(self.training)

    def train(self, mode: bool = True) -> "BPModel":
        super().train(mode)
        if self._frozen:
            self.encoders.eval()
        return self

    # ------------------------------------------------------------------ forward
    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, L) -> (B, n_features): what the head reads (before covariates)."""
        if not self.encoders:
            return x.new_zeros((x.shape[0], 0))
        if self.config.fusion == "early":
            return self.encoders["both"].features(x)
        maps = [enc.feature_map(x[:, i:i + 1]) for i, enc in enumerate(self.encoders.values())]
        pooled = [m.mean(-1) for m in maps]
        if self.config.fusion == "mid":
            pooled.append(self.fusion(torch.cat(maps, dim=1)).mean(-1))
        return torch.cat(pooled, dim=1)

    def forward(self, x: torch.Tensor, cov: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``cov`` (B, n_covariates); a (B, 0) tensor counts as none. With modality
        ``none`` x is only a (B, 0, L) placeholder."""
        n_channels = len(MODALITY_CHANNELS[self.config.modality])
        if x.dim() != 3 or x.shape[1] != n_channels:
            raise ValueError(f"modality {self.config.modality} needs x of shape "
                             f"(B, {n_channels}, L), got {tuple(x.shape)}")
        if cov is not None and cov.shape[-1] == 0:
            cov = None
        if (cov is None) != (self.config.n_covariates == 0):
            raise ValueError(f"the model takes {self.config.n_covariates} covariates; "
                             f"cov is {'missing' if cov is None else 'unexpected'}")
        raw = self.head(self.pooled_features(x), cov).float()
        if self.config.covariate_offset:
            with torch.autocast(raw.device.type, enabled=False):  # the ridge, in float32
                raw = raw + F.linear(cov.float(), self.offset_weight, self.offset_bias)
        return bound_output(raw, *self._bounds(), self.config.constrain)

    def _bounds(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.config.constrain != "none" and not self._bounds_ok:
            bounds = torch.cat([self.y_lo, self.y_hi])
            self._bounds_ok = bool(torch.isfinite(bounds).all())
            if not self._bounds_ok:
                raise RuntimeError("constrain needs bounds: call set_bounds(lo, hi) first")
        return self.y_lo, self.y_hi


def build_bp_model(cfg: Union[BPModelConfig, Mapping]) -> BPModel:
    """A ``BPModel`` from a config or a checkpoint's ``model_config`` dict."""
    return BPModel(normalise_config(cfg))


def param_groups(model: BPModel, lr_backbone: float, lr_head: float,
                 weight_decay: float) -> List[dict]:
    """AdamW groups: pre-trained vs new parameters at their own learning rates; biases and
    norm weights (1-D) without weight decay; frozen parameters left out. Each group has a
    ``name`` (``backbone``, ``backbone_no_decay``, ``head``, ``head_no_decay``)."""
    groups: Dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = "backbone" if model.is_pretrained(name) else "head"
        decay = param.ndim > 1
        key = part if decay else f"{part}_no_decay"
        group = groups.setdefault(key, {
            "name": key, "params": [], "lr": lr_backbone if part == "backbone" else lr_head,
            "weight_decay": weight_decay if decay else 0.0})
        group["params"].append(param)
    return list(groups.values())


# ----------------------------------------------------------------------------- pre-trained
_CONTAINERS = ("state_dict", "model", "model_state_dict")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# set by each run from its own training data, never taken from a pre-trained head
_RUN_KEYS = ("y_lo", "y_hi", "offset_weight", "offset_bias")


def _state_dict_of(obj, path: str) -> Tuple[str, Dict[str, torch.Tensor]]:
    """(where it was found, the tensors) of a loaded checkpoint object."""
    if isinstance(obj, Mapping):
        for key in _CONTAINERS:
            if isinstance(obj.get(key), Mapping):
                tensors = {k: v for k, v in obj[key].items() if isinstance(v, torch.Tensor)}
                if tensors:
                    return key, tensors
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) == len(obj):
            return "bare", tensors
    raise UserError(f"checkpoint {path} holds no state_dict (looked for a dict of tensors or "
                    f"one under {', '.join(_CONTAINERS)})")


def _strip_wrappers(key: str) -> str:
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _split_sources(state: Dict[str, torch.Tensor]) -> Tuple[str, Dict[str, dict], dict, list]:
    """(layout, {source name: Net1D state_dict without dense}, the rest, dropped keys).

    Source name ``*`` is a plain Net1D for every encoder."""
    if any(k.startswith("encoders.") for k in state):
        layout, strip = "project", "encoders."
    elif any(k.startswith(("ecg.", "ppg.", "both.")) for k in state):
        layout, strip = "joint", ""
    else:
        layout, strip = "net1d", None
    sources: Dict[str, dict] = {}
    rest, dropped = {}, []
    for key, value in state.items():
        if strip is None:
            name, sub = "*", key
        elif key.startswith(strip) and "." in key[len(strip):]:
            name, sub = key[len(strip):].split(".", 1)
        else:
            rest[key] = value
            continue
        if sub.startswith("dense."):
            dropped.append(key)
        else:
            sources.setdefault(name, {})[sub] = value
    return layout, sources, rest, dropped


def _match_encoder(encoder: Net1D, source: dict) -> dict:
    """Compare a source state_dict with an encoder's; widen a 1-channel first conv."""
    target = encoder.state_dict()
    to_load, widened, mismatched = {}, [], []
    for key in target.keys() & source.keys():
        want, got = target[key], source[key]
        if want.shape == got.shape:
            to_load[key] = got
        elif key == WIDENED_KEY and got.shape[1] == 1 and want.shape[1] == 2 and \
                want.shape[::2] == got.shape[::2]:
            to_load[key] = torch.cat([got, torch.zeros_like(got)], dim=1)
            widened.append(key)
        else:
            mismatched.append(f"{key} file {tuple(got.shape)} vs model {tuple(want.shape)}")
    return {"to_load": to_load, "loaded": len(to_load), "widened": widened,
            "missing": sorted(target.keys() - source.keys()),
            "unexpected": sorted(source.keys() - target.keys()), "mismatched": sorted(mismatched)}


def _source_for(name: str, sources: Dict[str, dict]) -> Tuple[str, dict]:
    for candidate in (name, "*") + (("ecg",) if name == "both" else ()):
        if candidate in sources:
            return candidate, sources[candidate]
    return "-", {}


def _check_encoder(path: str, name: str, match: dict, sources: Dict[str, dict]) -> None:
    """Raise ``UserError`` unless ``match`` is a complete, exact load of encoder ``name``."""
    where = f"checkpoint {path}, encoder {name!r}"
    if not match["loaded"]:
        found = ", ".join(sorted(sources)) or "none"
        raise UserError(f"{where}: nothing to load (Net1D sources in the file: {found}); "
                        f"see backbones.py for the layouts it reads")
    if match["mismatched"]:
        raise UserError(f"{where}: {len(match['mismatched'])} tensor(s) do not fit, e.g. "
                        f"{match['mismatched'][0]} (another --arch, or not a 1-lead model?)")
    # an unused BN step counter is harmless; any other gap would leave random weights
    missing = [k for k in match["missing"] if not k.endswith("num_batches_tracked")]
    if missing or match["unexpected"]:
        example = (missing or match["unexpected"])[0]
        raise UserError(f"{where}: {len(missing)} missing and {len(match['unexpected'])} "
                        f"unexpected tensor(s), e.g. {example} (another --arch?)")


def _encoding_mismatch(old: Sequence[Mapping], new: Sequence[Mapping]) -> Optional[str]:
    """Why a head fitted on the covariate encoding ``old`` cannot read ``new`` (None if
    it can: the same columns, kinds, levels and missing indicators; numeric means and
    SDs may differ, ``_refit_head`` absorbs them)."""
    names = ([s["name"] for s in old], [s["name"] for s in new])
    if names[0] != names[1]:
        return f"covariates differ (file {names[0]}, now {names[1]})"
    for a, b in zip(old, new):
        for key in ("kind", "levels", "missing_indicator"):
            if a.get(key) != b.get(key):
                return (f"covariate {a['name']} is encoded otherwise ({key} {a.get(key)} in "
                        f"the file, {b.get(key)} now)")
    return None


@torch.no_grad()
def _refit_head(model: BPModel, old: Mapping, new: Mapping) -> None:
    """Re-express a loaded head in this run's statistics, exactly: numeric covariate
    inputs x_old = x_new * sd_new / sd_old + (mean_new - mean_old) / sd_old are folded
    into the first linear layer, and normalised outputs y_new = (y_old * sd_old + mean_old
    - mean_new) / sd_new into the last. With the ridge offset the network adds sd * y to
    the ridge (which holds the mean and is refitted on this run's train split), so its
    outputs only rescale, y_new = y_old * sd_old / sd_new: shifting them by the change of
    the means as well would count that change twice. (A value missing in this run's data
    is filled with this run's train median, which the old head never saw as a fill.)"""
    first, last = model.head.mlp[0], model.head.mlp[-1]
    column = first.in_features - model.config.n_covariates
    for a, b in zip(old["covariates"], new["covariates"]):
        if a["kind"] == "numeric":
            scale, shift = b["std"] / a["std"], (b["mean"] - a["mean"]) / a["std"]
            first.bias += first.weight[:, column] * shift
            first.weight[:, column] *= scale
        column += len(covariate_names([a]))
    sd_old, mean_old, sd_new, mean_new = (torch.as_tensor(v, dtype=last.weight.dtype) for v in (
        old["target_std"], old["target_mean"], new["target_std"], new["target_mean"]))
    mean_shift = 0.0 if model.config.covariate_offset else mean_old - mean_new
    last.weight *= (sd_old / sd_new)[:, None]
    last.bias.copy_((last.bias * sd_old + mean_shift) / sd_new)


def _load_head(model: BPModel, ckpt, rest: dict, target_cols: Optional[Sequence[str]],
               stats: Optional[Mapping]) -> dict:
    """Load the non-encoder tensors of a project checkpoint when they fit, re-expressed
    in this run's ``stats`` (``target_mean``, ``target_std``, ``covariates`` encoding);
    otherwise say why not."""
    head = {k: v for k, v in rest.items() if k not in _RUN_KEYS}
    own = {k: v for k, v in model.state_dict().items()
           if not k.startswith("encoders.") and k not in _RUN_KEYS}
    file_cols = ckpt.get("target_cols") if isinstance(ckpt, Mapping) else None
    if not head:
        return {"loaded": 0, "reason": "the file has no head"}
    if target_cols is None or file_cols is None or list(file_cols) != list(target_cols):
        return {"loaded": 0, "reason": f"target_cols differ (file {file_cols}, "
                                       f"now {None if target_cols is None else list(target_cols)})"}
    mismatch = _encoding_mismatch(ckpt.get("covariates", []),
                                  stats["covariates"] if stats else [])
    file_offset = bool(ckpt.get("model_config", {}).get("covariate_offset", False))
    if not mismatch and file_offset != model.config.covariate_offset:
        mismatch = (f"the file's head {'adds' if file_offset else 'does not add'} the ridge "
                    f"offset and this model's {'does not' if file_offset else 'does'}")
    if mismatch:
        return {"loaded": 0, "reason": mismatch}
    if head.keys() != own.keys() or any(head[k].shape != own[k].shape for k in own):
        return {"loaded": 0, "reason": "head shapes differ (fusion, head or covariates changed)"}
    if stats is not None and not {"target_mean", "target_std"} <= ckpt.keys():
        return {"loaded": 0, "reason": "the file does not record the target statistics its "
                                       "head was trained against"}
    model.load_state_dict(head, strict=False)
    if stats is None:
        return {"loaded": len(head), "reason": "target_cols and shapes match"}
    _refit_head(model, ckpt, stats)
    return {"loaded": len(head), "reason": "target_cols and shapes match; re-expressed in "
                                           "this run's target statistics and covariate "
                                           "encoding"}


def _settings_text(arch: str, modality: str, fusion: str) -> str:
    return f"--arch {arch} --modality {modality}" + (
        f" --fusion {fusion}" if modality == "both" else "")


def _check_encoder_settings(model: BPModel, ckpt, path: str) -> None:
    """A file that records the settings its encoders were trained with (``encoder_settings``
    with ``arch``, ``modality``, ``fusion``, ``net1d``: pretrain_ssl.py's ssl_encoders.pth)
    must match this model's encoders: the same Net1D and the same encoders (late and mid
    fusion have the same two); ``UserError`` naming both settings otherwise."""
    saved = ckpt.get("encoder_settings") if isinstance(ckpt, Mapping) else None
    if not isinstance(saved, Mapping):
        return
    cfg = model.config
    ignore = ("in_channels", "n_classes")
    same_net = ({k: v for k, v in dict(saved["net1d"]).items() if k not in ignore}
                == {k: v for k, v in cfg.net1d.items() if k not in ignore})
    if same_net and encoder_names(saved["modality"], saved["fusion"]) == tuple(model.encoders):
        return
    raise UserError(f"checkpoint {path} holds encoders pre-trained with "
                    f"{_settings_text(saved['arch'], saved['modality'], saved['fusion'])}, "
                    f"but this model is {_settings_text(cfg.arch, cfg.modality, cfg.fusion)}: "
                    f"use the settings of the pre-training (late and mid fusion share "
                    f"their encoders)")


def load_pretrained(model: BPModel, path: str, trust: bool = False,
                    target_cols: Optional[Sequence[str]] = None, verbose: bool = True,
                    stats: Optional[Mapping] = None) -> dict:
    """Load a pre-trained file into every encoder of ``model`` (and a matching head: same
    ``target_cols``, covariates encoded alike, same shapes; with ``stats``, this run's
    ``target_mean``, ``target_std`` and ``covariates`` encoding, the head is re-expressed
    in them, so it predicts the same mmHg as in the run that trained it).

    Returns (and prints when ``verbose``) the report: layout, per encoder the counts of
    tensors loaded, missing, unexpected and shape-mismatched, and the head's outcome.
    Raises ``UserError`` naming ``path`` for every case listed in the module docstring.
    """
    ckpt = load_checkpoint(path, trust=trust)
    _check_encoder_settings(model, ckpt, path)
    container, state = _state_dict_of(ckpt, path)
    state = {_strip_wrappers(k): v for k, v in state.items()}
    layout, sources, rest, dropped = _split_sources(state)
    report = {"path": path, "container": container, "layout": layout, "dropped": dropped,
              "encoders": {}}
    matches = {}
    for name, encoder in model.encoders.items():
        source_name, source = _source_for(name, sources)
        match = _match_encoder(encoder, source)
        _check_encoder(path, name, match, sources)
        matches[name] = match
        report["encoders"][name] = {"source": source_name, **{
            k: v for k, v in match.items() if k != "to_load"}}
    for name, match in matches.items():
        model.encoders[name].load_state_dict(match["to_load"], strict=False)
    report["head"] = (_load_head(model, ckpt, rest, target_cols, stats)
                      if layout == "project"
                      else {"loaded": 0, "reason": "the file has no head"})
    if layout == "project" and stats is not None \
            and ckpt.get("conditioning") != stats.get("conditioning"):
        report["warning"] = (f"{path} was trained on records filtered "
                             f"{_filter_name(ckpt.get('conditioning'))}, this run filters "
                             f"{_filter_name(stats.get('conditioning'))}: give train_bp.py "
                             f"--filter as in that run")
    if verbose:
        print(format_report(report))
    return report


def format_report(report: dict) -> str:
    """The load report as printed lines."""
    lines = [f"pretrained {report['path']}: state_dict from '{report['container']}', "
             f"layout {report['layout']}, {len(report['dropped'])} dense tensor(s) dropped"]
    for name, enc in report["encoders"].items():
        widened = (f" (widened to 2 input channels, PPG slice zero: {', '.join(enc['widened'])})"
                   if enc["widened"] else "")
        lines.append(f"  encoder {name} <- {enc['source']}: {enc['loaded']} loaded, "
                     f"{len(enc['missing'])} missing, {len(enc['unexpected'])} unexpected, "
                     f"{len(enc['mismatched'])} shape-mismatched{widened}")
    lines.append(f"  head: {report['head']['loaded']} loaded ({report['head']['reason']})")
    if "warning" in report:
        lines.append(f"warning: {report['warning']}")
    return "\n".join(lines)


def _filter_name(conditioning: Optional[Mapping]) -> str:
    """A checkpoint's ``conditioning`` in words: 'none' or 'ecgfounder at 500 Hz'."""
    return f"{conditioning['filter']} at {conditioning['fs']:g} Hz" if conditioning else "none"


def count_parameters(module: nn.Module) -> Tuple[int, int]:
    """(all parameters, trainable parameters)."""
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
