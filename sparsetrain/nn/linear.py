"""`SparseLinear`: a drop-in `nn.Linear` whose forward uses the N:M effective weight W~."""

from __future__ import annotations

import math
import warnings
import zlib
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import backends
from ..config import SparsityConfig, engine_requirements
from ..methods import effective_weight, masked_weight
from ..ops.mvue import mix_seed
from ..ops.nm import check_finite
from ..targets import is_conv1d
from ._packing import pack_mask, packed_numel, unpack_mask

__all__ = ["SparseLinear", "local_tensor", "mix_seed", "layer_seed", "seed_names"]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank-local part of a tensor: a DTensor's shard (FSDP2), or the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor gathered from all ranks (a collective), or the tensor itself."""
    gather = getattr(t, "full_tensor", None)
    return gather() if callable(gather) else t


# What only an engine acts on comes from the config's declarations (`engine_requirements`: the
# method's per-step rule and each field declared with an engine need); each warns once per process.
_WARNED_NO_ENGINE: set = set()


def _warn_without_engine(config: SparsityConfig) -> None:
    for key, message in engine_requirements(config):
        if key not in _WARNED_NO_ENGINE:
            _WARNED_NO_ENGINE.add(key)
            warnings.warn(
                f"{message}. Attach the engine: `sparsity = sparsetrain.Sparsifier(model, cfg); "
                f"sparsity.attach(optimizer)` (or use the SparseTraining / SparseTrainerCallback adapters).",
                stacklevel=3,
            )


def _backend_for(config: SparsityConfig, weight: torch.Tensor, dtype: torch.dtype, sparse: bool) -> str:
    """The backend of a layer's matmul for a compute dtype (`SparseLinear` caches the answer)."""
    if not sparse or config.backend == "dense":
        return "dense"
    if (config.n, config.m) != (2, 4):
        if config.backend == "cusparselt":
            raise ValueError(f"`backend`='cusparselt' runs 2:4 only, got {config.n}:{config.m}. Use 'auto' or 'dense'.")
        return "dense"
    # FP8 runs the sparse GEMM in e4m3, whose shape rules are stricter (multiples of 32); it
    # returns bf16/fp16, so a float32 input is judged (and refused) as float32.
    fp8_ok = config.fp8 and dtype in (torch.float16, torch.bfloat16)
    return backends.select_backend(config.backend, weight, torch.float8_e4m3fn if fp8_ok else dtype)[0]


# The MVUE seed of a layer when the config gives none: fixed, so a run (and its resume) draws the
# same numbers whatever the process's global seed or what was built before.
DEFAULT_MVUE_SEED = 20_24


def layer_seed(config_seed: Optional[int], name: Optional[str]) -> int:
    """A layer's MVUE seed: a function of the config's ``seed`` (`DEFAULT_MVUE_SEED` when None) and
    the layer's qualified name (CRC-32), so every layer draws its own stream, the same in any process.

    Example:
        >>> layer_seed(None, "h.0.mlp.c_fc") == layer_seed(None, "h.0.mlp.c_fc") != layer_seed(None, "h.1.mlp.c_fc")
        True
    """
    base = DEFAULT_MVUE_SEED if config_seed is None else config_seed
    return mix_seed(base, zlib.crc32((name or "").encode()))


def _save_layout(module: "SparseLinear", state_dict, prefix: str, local_metadata: dict) -> None:
    # The state dict's metadata (not a key: `nn.Linear` loads the same keys) says what the layer
    # was made for, so a load into another N:M is refused instead of training on with a wrong beta.
    c = module.config
    local_metadata["sparsetrain"] = {"method": c.method, "n": c.n, "m": c.m}


class _KeptMask:
    """One mask kept packed (1 bit per weight) under a key: the (weight, layer state) versions it is valid for."""

    def __init__(self) -> None:
        self.key, self.packed = None, None

    def keep(self, key: tuple, mask: torch.Tensor) -> None:
        if key != self.key:  # accumulated micro-batches: packed once
            self.key, self.packed = key, pack_mask(mask)

    def get(self, key: tuple, shape: torch.Size) -> Optional[torch.Tensor]:
        return unpack_mask(self.packed, shape) if key == self.key and self.packed is not None else None


class _MaskedWeight(torch.autograd.Function):
    """W~ of a method with its backward rule, handing the projection's mask to ``sink`` (so a
    layer keeps what the projection computed, instead of projecting again for the decay)."""

    @staticmethod
    def forward(ctx, weight, rule, n, m, beta, ramp, sink):
        ctx.rule = rule
        w_eff, mask = masked_weight(weight, rule, n, m, beta, ramp=ramp)
        sink.append(mask)
        return w_eff

    @staticmethod
    def backward(ctx, grad):
        return ctx.rule.backward(grad), None, None, None, None, None, None


def seed_names(names: List[str]) -> List[str]:
    """The layers' names for their MVUE seeds: the qualified names less the dotted prefix they all
    share (each keeps at least its last part), so a model wrapped in another module (a
    LightningModule's ``model.``) keeps its layers' seeds.

    Example:
        >>> seed_names(["model.h.0.fc", "model.h.1.fc"])
        ['0.fc', '1.fc']
    """
    parts = [name.split(".") for name in names]
    k = 0
    while parts and all(len(p) > k + 1 for p in parts) and len({p[k] for p in parts}) == 1:
        k += 1
    return [".".join(p[k:]) for p in parts]


def _transposable_mask_of(weight: torch.Tensor, cfg: SparsityConfig) -> torch.Tensor:
    """The transposable N:M mask of ``|weight|`` (the kernel on CUDA)."""
    from ..ops.transposable import transposable_mask

    if weight.shape[0] % cfg.m or weight.shape[1] % cfg.m:
        raise ValueError(
            f"`transposable=True` needs both weight dims to be multiples of m={cfg.m}, got {tuple(weight.shape)}"
        )
    return transposable_mask(weight.abs().float(), cfg.n, cfg.m, method=cfg.transposable_method)


def _check_layout(saved: Optional[dict], c: SparsityConfig, name: str) -> None:
    """Refuse a state saved by a layer of another N:M; warn for another method."""
    if saved and (saved["n"], saved["m"]) != (c.n, c.m):
        raise ValueError(
            f"Cannot load `{name}`: its state was saved by a {saved['n']}:{saved['m']} {saved['method']} layer, "
            f"this layer is {c.n}:{c.m} {c.method}. Build the model with the checkpoint's n and m."
        )
    if saved and saved["method"] != c.method:
        warnings.warn(f"`{name}`: loading the state of a {saved['method']} layer into a {c.method} layer "
                      f"(beta and masks are used as this method defines them)", stacklevel=5)


def _weight_of(module: nn.Module, name: str) -> Tuple[nn.Parameter, str]:
    """A dense layer's weight as ``[out, in]`` and its kind: an `nn.Linear`'s own Parameter, or a new
    transposed one for a `transformers` ``Conv1D`` (which stores W^T as ``[in, out]``).

    Raises:
        ValueError: the weight holds NaN/inf.
    """
    if is_conv1d(module):
        weight = nn.Parameter(module.weight.detach().t().contiguous(), requires_grad=module.weight.requires_grad)
        source = "conv1d"
    elif isinstance(module, nn.Linear):
        weight, source = module.weight, "linear"
    else:
        raise TypeError(f"`module` ({name}) must be an nn.Linear or transformers Conv1D, got {type(module).__name__}")
    check_finite(weight.detach(), name=f"{name}.weight")
    return weight, source


def _plain_layer(w: torch.Tensor, bias: Optional[torch.Tensor], conv1d: bool, requires_grad: bool) -> nn.Module:
    """An `nn.Linear` holding ``w`` ``[out, in]`` (or a `transformers` ``Conv1D`` holding its transpose)."""
    out_f, in_f = w.shape
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        out = Conv1D(out_f, in_f)
        out.to(device=w.device, dtype=w.dtype)
        out.weight.data = w.t().contiguous()
    else:
        out = nn.Linear(in_f, out_f, bias=bias is not None, device=w.device, dtype=w.dtype)
        out.weight.data = w
    if bias is not None:
        out.bias.data = bias.clone()
    out.weight.requires_grad_(requires_grad)
    return out


def _sparse_input_linear(layer: "SparseLinear", x: torch.Tensor, w: torch.Tensor, bias) -> torch.Tensor:
    """``(x * mask_N:M(x)) @ W~^T + b`` for a layer with sparse inputs (`ops.activation`):
    cuSPARSELt with ``X~`` as the structured operand where it can run, the torch reference (a
    custom op with its closed-form backward) elsewhere."""
    from ..ops.activation import activation_sparse_linear

    n, m = layer.input_nm
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    use_cslt = False
    if layer.config.backend != "dense" and x.is_cuda:
        from ..backends import cusparselt_activation

        ok, reason = cusparselt_activation.can_use(layer.weight, x, dtype, n, m)
        if not ok and layer.config.backend == "cusparselt":
            raise ValueError(f"`backend`='cusparselt' cannot run this layer's sparse activations: {reason}")
        use_cslt = ok
    layer.backend_name = "cusparselt" if use_cslt else "dense"
    if torch.is_autocast_enabled(dev):
        # Custom autograd functions see no autocast in backward: cast the operands here once.
        x, w = x.to(dtype), w.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(dev, enabled=False):
        if not use_cslt:
            return activation_sparse_linear(x, w, bias, n, m)
        transposable = layer.config.transposable and layer.sparse_active
        if transposable:  # W~^T is compressed once per optimizer step, as in the weight path
            layer._backend_cache["key"] = (layer.weight._version, layer._state_version, w.dtype, w.device)
        return cusparselt_activation.activation_linear(x, w, bias, cache=layer._backend_cache, transposable=transposable)


class SparseLinear(nn.Linear):
    """An `nn.Linear` trained N:M sparse: ``y = x @ W~^T + b`` with ``W~`` from ``config.method``.

    The dense parameter ``weight`` is what the optimizer updates; ``W~`` (see
    `sparsetrain.methods`) is recomputed from it in every forward. The state dict keeps ``weight``
    and ``bias`` under `nn.Linear`'s names, plus ``beta`` (S-STE's frozen scale; NaN until
    computed) and, for transposable masks only, ``mask_packed`` (the mask in use, 1 bit per
    weight). Other methods store no mask: it follows from the weights (`current_mask`).

    Per-step rules (SR-STE's decay, masked decay, mask refresh, schedules) belong to an engine,
    `sparsetrain.Sparsifier`; a layer trained without one warns once if its config needs one.

    Args:
        in_features: must be a multiple of ``config.m`` (groups run along the input dim).
        out_features, bias, device, dtype: as for `nn.Linear`.
        config: a `SparsityConfig`; defaults to S-STE 2:4.
        name: the layer's name in its model (see `seed_names`); its MVUE seed is `layer_seed` of the
            config's ``seed`` and this name (`sparsify` and `Sparsifier` name the layers they swap or adopt).

    Example:
        >>> layer = SparseLinear(8, 4, config=SparsityConfig(method="ste"))
        >>> bool(((layer.effective_weight() != 0).view(4, 2, 4).sum(-1) <= 2).all())
        True
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, config: Optional[SparsityConfig] = None,
                 device=None, dtype=None, name: Optional[str] = None) -> None:
        config = SparsityConfig() if config is None else config
        if not isinstance(config, SparsityConfig):
            raise TypeError(f"`config` must be a SparsityConfig, got {type(config).__name__}")
        if in_features % config.m != 0:
            raise ValueError(
                f"`in_features`={in_features} is not a multiple of m={config.m}: N:M groups run along the "
                f"input dimension. Leave this layer dense, or pad its input."
            )
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.config = config
        self.register_buffer("beta", torch.full((), math.nan, device=device, dtype=torch.float32))
        if config.transposable:
            self.register_buffer(
                "mask_packed", torch.full((packed_numel(out_features * in_features),), 255, device=device, dtype=torch.uint8)
            )
        # Plain attributes: they steer Python control flow (torch.compile guards on them).
        self._sparse = config.sparse  # the phase: False while an engine trains this layer dense
        self.source = "linear"  # or "conv1d": what `to_dense`/`export` give back
        self.name = name  # its name in the model (None: not known yet); the MVUE seed follows from it
        self.seed = layer_seed(config.seed, name)
        self._mvue_draw: Optional[torch.Tensor] = None  # the next MVUE draw (seed, offset); None: from `seed`
        self._beta_ready = False  # a Python flag, so the forward never syncs on the beta buffer
        self.backend_name = "dense"
        self._backend_key = None  # (device, dtype) the backend was chosen for
        self._backend_cache: dict = {}
        self._state_version = 0  # bumps whenever W~ may change other than through the weight (keys the cache)
        self.engine_attached = False  # True once a `sparsetrain.Sparsifier` owns this layer
        self._ramp = 1.0  # S-STE's threshold ramp in [0, 1] (1: plain S-STE)
        self.input_nm: Optional[Tuple[int, int]] = None  # (n, m): `sparsify` made the input N:M per token
        self._input_active = True  # False in the engine's dense phases
        self._keep_mask = False
        self._fwd_mask = _KeptMask()
        self.register_state_dict_post_hook(_save_layout)
        self.reset_sparsity_state()

    # ----------------------------------------------------------------------------------- build
    @classmethod
    def from_dense(cls, module: nn.Module, config: Optional[SparsityConfig] = None, name: str = "module") -> "SparseLinear":
        """Wrap an `nn.Linear` (reusing its Parameters) or a `transformers` ``Conv1D`` (transposed).

        Raises:
            ValueError: the input dim is not a multiple of ``m``, or the weights hold NaN/inf.
        """
        config = SparsityConfig() if config is None else config
        weight, source = _weight_of(module, name)
        out_f, in_f = weight.shape
        with torch.device("meta"):
            layer = cls(in_f, out_f, bias=module.bias is not None, config=config, name=name)
        layer.weight = weight
        layer.bias = module.bias
        layer.beta = torch.full((), math.nan, device=weight.device, dtype=torch.float32)
        if config.transposable:
            layer.mask_packed = torch.full((packed_numel(out_f * in_f),), 255, device=weight.device, dtype=torch.uint8)
        layer.source = source
        layer.reset_sparsity_state()
        return layer

    def reset_sparsity_state(self, beta: Optional[torch.Tensor] = None) -> None:
        """Take beta (S-STE) and a transposable mask from the weights as they are now.

        ``beta`` overrides the locally computed scale (the engine passes the all-reduced one
        under FSDP2, where this rank holds only some rows of the weight)."""
        if self.weight.is_meta:
            return
        self._state_version += 1  # W~ may change (beta, mask): a cached compressed W~ is stale
        with torch.no_grad():
            if self.config.rule.has_scale:
                if beta is None:
                    beta = self.config.rule.scale(local_tensor(self.weight.detach()), self.config.n, self.config.m)
                self.beta.copy_(beta)
                self._beta_ready = True
            if self.config.transposable:
                self.refresh_transposable_mask()

    def set_name(self, name: str) -> None:
        """Name the layer (see `seed_names`); its MVUE seed follows from the name."""
        self.name, self.seed, self._mvue_draw = name, layer_seed(self.config.seed, name), None

    def set_step_state(self, *, sparse: bool, ramp: float = 1.0, step: int = 0, rank: int = 0,
                       keep_mask: bool = False) -> None:
        """The per-step state an engine sets before each step: the phase (``sparse=False``: train the
        dense W), S-STE's threshold ``ramp`` in [0, 1], the MVUE seed of ``(seed, rank, step)`` (draws
        distinct per data-parallel rank; a resume needs only the step), and whether to keep the
        training forward's mask for `forward_mask` (an engine's decay reads it)."""
        self._input_active = bool(sparse)  # sparse activations follow the engine's phases too
        sparse = bool(sparse) and self.config.sparse
        ramp = float(ramp)
        if sparse != self._sparse or ramp != self._ramp:
            self._state_version += 1  # W~ changes with the phase and the ramp: a cached W~ is stale
        self._sparse, self._ramp, self._keep_mask = sparse, ramp, bool(keep_mask)
        self._mvue_draw = torch.tensor([mix_seed(self.seed, rank, step), 0], device="cpu")

    @property
    def sparse_active(self) -> bool:
        """False while training dense (the engine's dense warm-up / fine-tuning, or ``method="dense"``)."""
        return self._sparse

    input_sparse_active = property(lambda self: self.input_nm is not None and self._input_active,
                                   doc="True when this layer's input is made N:M in the current phase.")

    @property
    def ramp(self) -> float:
        """S-STE's threshold ramp in [0, 1] of the current step (1: plain S-STE)."""
        return self._ramp

    # ----------------------------------------------------------------------------------- masks
    @property
    def mask(self) -> torch.Tensor:
        """The N:M mask in use (bool, shaped like ``weight``): the stored transposable mask, or
        the mask that follows from the current weights. Rank-local under FSDP2."""
        if self.config.transposable:
            return unpack_mask(self.mask_packed, local_tensor(self.weight).shape) if not self.weight.is_meta \
                else torch.ones(self.weight.shape, dtype=torch.bool, device="meta")
        return self.current_mask()

    def current_mask(self) -> torch.Tensor:
        """The mask W~ uses now, from one projection of the (rank-local) weights."""
        return self.projection()[1]

    @torch.no_grad()
    def projection(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(W~, mask)`` of the sparse method from the rank-local weights, without autograd."""
        cfg = self.config
        weight = local_tensor(self.weight.detach())
        if not cfg.sparse:
            return weight, torch.ones_like(weight, dtype=torch.bool)
        if cfg.transposable:
            mask = unpack_mask(self.mask_packed, weight.shape)
            return weight * mask, mask
        w_eff, mask = masked_weight(weight, cfg.rule, cfg.n, cfg.m, self._beta(), ramp=self._ramp)
        return w_eff, mask

    # ----------------------------------------------------------------------------------- forward

    def _beta(self) -> Optional[torch.Tensor]:
        if not self.config.rule.has_scale:
            return None
        if not self._beta_ready:
            # Built on the meta device and filled later: the scale is taken now, once.
            with torch.no_grad():
                self.beta.copy_(self.config.rule.scale(local_tensor(self.weight.detach()), self.config.n, self.config.m))
            self._beta_ready = True
        return self.beta

    def _weight_autograd(self) -> torch.Tensor:
        cfg = self.config
        if not self._sparse:
            return self.weight
        fixed = unpack_mask(self.mask_packed, self.weight.shape) if cfg.transposable else None
        if self._keep_mask and fixed is None and torch.is_grad_enabled():
            # The engine's decay reads this step's mask: keep the one the projection makes anyway.
            sink: list = []
            w_eff = _MaskedWeight.apply(self.weight, cfg.rule, cfg.n, cfg.m, self._beta(), self._ramp, sink)
            self._fwd_mask.keep((self.weight._version, self._state_version), sink[0])
            return w_eff
        return effective_weight(self.weight, cfg.rule, cfg.n, cfg.m, beta=self._beta(), fixed_mask=fixed, ramp=self._ramp)

    def forward_mask(self) -> Optional[torch.Tensor]:
        """The mask of the last training forward, if the weights and this layer's state are unchanged
        since (accumulated micro-batches share it); None otherwise, or under FSDP2 (whose forward sees
        the gathered weight, not this rank's shard). Kept only when `set_step_state` asked for it."""
        if hasattr(self.weight, "to_local"):
            return None
        return self._fwd_mask.get((self.weight._version, self._state_version), self.weight.shape)

    def effective_weight(self) -> torch.Tensor:
        """The W~ the forward uses, detached (exactly N:M unless training has switched to dense).

        Under FSDP2 the weight is gathered from all ranks first (a collective: call it on every rank)."""
        with torch.no_grad():
            weight = full_tensor(self.weight.detach())
            if not self._sparse:
                return weight
            cfg = self.config
            fixed = unpack_mask(self.mask_packed, weight.shape) if cfg.transposable else None
            return masked_weight(weight, cfg.rule, cfg.n, cfg.m, self._beta(), fixed, need_mask=False, ramp=self._ramp)[0]

    def _next_draw(self) -> torch.Tensor:
        """``(seed, offset)`` of this forward's MVUE draw; the offset counts the draws since the
        seed was set, so micro-batches of one step draw apart. Draw 0 of a seed is
        ``torch.Generator().manual_seed(seed)``'s stream (`ops.mvue.draw_generator`). An int64 CPU
        tensor: read by the host with no sync, and traced by torch.compile (a Python int would be
        guarded on and recompiled for every new value)."""
        draw = self._mvue_draw if self._mvue_draw is not None else torch.tensor([self.seed, 0], device="cpu")
        # A new tensor, not an in-place update: the draw handed out here is saved for the backward
        # and must keep its value (compiled, an in-place update reached the saved copy too).
        self._mvue_draw = draw + torch.tensor([0, 1], device="cpu")
        return draw

    def _choose_backend(self, x: torch.Tensor, sparse: bool) -> str:
        """The backend for this input's device and compute dtype (decided once per pair)."""
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        key = (x.device, dtype, sparse)
        if key != self._backend_key:
            self.backend_name, self._backend_key = _backend_for(self.config, self.weight, dtype, sparse), key
        return self.backend_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.engine_attached and torch.is_grad_enabled():
            _warn_without_engine(self.config)
        w = self._weight_autograd()
        bias = self.bias
        if self.input_sparse_active:
            return _sparse_input_linear(self, x, w, bias)
        sparse = self._sparse
        mvue = self.config.mvue if sparse else None
        fp8 = self.config.fp8 and sparse
        # Mid threshold-ramp W~ is not N:M yet: only the dense GEMM can take it.
        backend = self._choose_backend(x, sparse and self.config.rule.is_exact(self._ramp))
        if mvue is None and not fp8 and backend == "dense":
            return F.linear(x, w, bias)
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            # Custom autograd functions see no autocast in backward: cast the operands here once.
            dt = torch.get_autocast_dtype(dev)
            x, w = x.to(dt), w.to(dt)
            bias = bias.to(dt) if bias is not None else None
        kwargs = dict(mvue=mvue, generator=self._next_draw() if mvue else None, fp8=fp8, cache=self._backend_cache)
        if backend == "cusparselt":
            # W~ is compressed once per optimizer step: the cache is keyed by the weight's version,
            # and by the dtype and device W~ is computed in (`.half()` or a new autocast dtype keep
            # the version but need a new compressed weight).
            self._backend_cache["key"] = (self.weight._version, self._state_version, w.dtype, w.device)
            kwargs["transposable"] = self.config.transposable
        with torch.autocast(dev, enabled=False):
            return backends.get_backend(backend).linear(x, w, bias, **kwargs)

    @torch.no_grad()
    def refresh_transposable_mask(self) -> int:
        """Recompute the transposable mask from |W| (T-STE / T-SR-STE); return the entries flipped."""
        weight = local_tensor(self.weight.detach())
        new = _transposable_mask_of(weight, self.config).to(self.mask_packed.device)
        old = unpack_mask(self.mask_packed, weight.shape)
        self._state_version += 1
        self.mask_packed.copy_(pack_mask(new))
        return int((new != old).sum())

    # ----------------------------------------------------------------------------------- convert
    def to_dense(self, effective: bool = False, as_linear: bool = False) -> nn.Module:
        """A plain `nn.Linear` (or ``Conv1D`` if this layer came from one, unless ``as_linear``)
        with the dense weight W, or with W~ when ``effective=True`` (what `sparsetrain.export` uses)."""
        w = self.effective_weight() if effective else full_tensor(self.weight.detach())
        bias = full_tensor(self.bias.detach()) if self.bias is not None else None
        return _plain_layer(w.clone(), bias, conv1d=self.source == "conv1d" and not as_linear,
                            requires_grad=self.weight.requires_grad)

    def _apply(self, fn, *args, **kwargs):
        # `.to()`, `.half()`, `.cuda()`: the compressed W~ and the backend choice belong to the old
        # dtype / device (the weight's `_version` does not change with them).
        self._backend_cache.clear()
        self._backend_key = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        _check_layout(local_metadata.get("sparsetrain"), self.config, prefix[:-1] or "layer")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)
        self._state_version += 1
        if self.config.rule.has_scale and prefix + "beta" in state_dict:
            self._beta_ready = bool(torch.isfinite(self.beta))
        self._backend_cache.clear()  # a cached compressed weight belongs to the old weights

    def extra_repr(self) -> str:
        c = self.config
        extra = (f", mvue={c.mvue}" if c.mvue else "") + (", transposable" if c.transposable else "")
        extra += ", fp8" if c.fp8 else ""
        phase = "" if self._sparse or not c.sparse else ", dense phase"
        if self.input_nm is not None:
            extra += f", input {self.input_nm[0]}:{self.input_nm[1]}" + ("" if self._input_active else " (dense phase)")
        return f"{super().extra_repr()}, method={c.method}, {c.n}:{c.m}{extra}, backend={self.backend_name}{phase}"
