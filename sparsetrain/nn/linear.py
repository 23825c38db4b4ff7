"""`SparseLinear`: a drop-in `nn.Linear` whose forward uses the N:M effective weight W~."""

from __future__ import annotations

import itertools
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import backends, kernels
from ..config import SparsityConfig
from ..methods import effective_weight, masked_weight
from ..ops.nm import check_finite, sste_scale

__all__ = ["SparseLinear", "is_conv1d"]


def is_conv1d(module: nn.Module) -> bool:
    """True for `transformers`' ``Conv1D`` (GPT-2's linear layer that stores W^T as ``[in, out]``)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers missing or broken: no Conv1D can exist
        return False
    return isinstance(module, Conv1D)


_LAYERS_BUILT = itertools.count()


def _next_default_seed() -> int:
    """An MVUE seed for a layer built without ``config.seed``: distinct per layer, reproducible
    under `torch.manual_seed`, and drawn without advancing the global generator (so sparsifying
    a model leaves the data order and dropout of a seeded run as they were)."""
    return (torch.initial_seed() + 7919 * (next(_LAYERS_BUILT) + 1)) % (2**31 - 1)


class SparseLinear(nn.Linear):
    """An `nn.Linear` trained N:M sparse: ``y = x @ W~^T + b`` with ``W~`` from ``config.method``.

    The dense parameter ``weight`` is what the optimizer updates; ``W~`` (see
    `sparsetrain.methods`) is recomputed from it in every forward. The state dict keeps ``weight``
    and ``bias`` under `nn.Linear`'s names, plus two buffers: ``beta`` (S-STE's frozen scale; NaN
    until computed) and ``mask`` (the mask at the last optimizer step; with transposable masks,
    the mask in use).

    Args:
        in_features: must be a multiple of ``config.m`` (groups run along the input dim).
        out_features, bias, device, dtype: as for `nn.Linear`.
        config: a `SparsityConfig`; defaults to S-STE 2:4.

    Example:
        >>> layer = SparseLinear(8, 4, config=SparsityConfig(method="ste"))
        >>> bool(((layer.effective_weight() != 0).view(4, 2, 4).sum(-1) <= 2).all())
        True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        config: Optional[SparsityConfig] = None,
        device=None,
        dtype=None,
    ) -> None:
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
        self.register_buffer("mask", torch.ones(out_features, in_features, device=device, dtype=torch.bool))
        # Plain attributes: they steer Python control flow (torch.compile guards on them).
        self.sparse_active = config.sparse
        self.source = "linear"  # or "conv1d": what `to_dense`/`export` give back
        self.seed = config.seed if config.seed is not None else _next_default_seed()
        self._beta_ready = False  # a Python flag, so the forward never syncs on the beta buffer
        self._generators: Dict[str, torch.Generator] = {}
        self.backend_name = "dense"
        self._backend_key = None  # (device, dtype) the backend was chosen for
        self._backend_cache: dict = {}
        self._mask_version = 0  # bumps when beta or a transposable mask changes (keys the cache)
        self.reset_sparsity_state()

    # ----------------------------------------------------------------------------------- build
    @classmethod
    def from_dense(cls, module: nn.Module, config: Optional[SparsityConfig] = None, name: str = "module") -> "SparseLinear":
        """Wrap an `nn.Linear` (reusing its Parameters) or a `transformers` ``Conv1D`` (transposed).

        Raises:
            ValueError: the input dim is not a multiple of ``m``, or the weights hold NaN/inf.
        """
        config = SparsityConfig() if config is None else config
        if is_conv1d(module):
            in_f, out_f = module.weight.shape  # Conv1D stores W^T: (in, out)
            weight = nn.Parameter(module.weight.detach().t().contiguous(), requires_grad=module.weight.requires_grad)
            source = "conv1d"
        elif isinstance(module, nn.Linear):
            out_f, in_f = module.weight.shape
            weight = module.weight
            source = "linear"
        else:
            raise TypeError(f"`module` ({name}) must be an nn.Linear or transformers Conv1D, got {type(module).__name__}")
        check_finite(weight.detach(), name=f"{name}.weight")
        with torch.device("meta"):
            layer = cls(in_f, out_f, bias=module.bias is not None, config=config)
        layer.weight = weight
        layer.bias = module.bias
        layer.beta = torch.full((), math.nan, device=weight.device, dtype=torch.float32)
        layer.mask = torch.ones(out_f, in_f, device=weight.device, dtype=torch.bool)
        layer.source = source
        layer.reset_sparsity_state()
        return layer

    def reset_sparsity_state(self) -> None:
        """Compute beta (S-STE) and the current mask from the weights as they are now."""
        if self.weight.is_meta:
            return
        self._mask_version += 1  # W~ may change (beta, mask): a cached compressed W~ is stale
        with torch.no_grad():
            if self.config.method == "s-ste":
                self.beta.copy_(sste_scale(self.weight, self.config.n, self.config.m))
                self._beta_ready = True
            if self.config.transposable:
                self.refresh_transposable_mask()
            elif self.config.sparse:
                self.mask.copy_(self._current_mask())

    # ----------------------------------------------------------------------------------- forward
    def _current_mask(self) -> torch.Tensor:
        _, mask = masked_weight(self.weight.detach(), self.config.method, self.config.n, self.config.m, self._beta())
        return mask

    def _beta(self) -> Optional[torch.Tensor]:
        if self.config.method != "s-ste":
            return None
        if not self._beta_ready:
            # Built on the meta device and filled later: the scale is taken now, once.
            with torch.no_grad():
                self.beta.copy_(sste_scale(self.weight, self.config.n, self.config.m))
            self._beta_ready = True
        return self.beta

    def _method(self) -> str:
        return self.config.method if self.sparse_active else "dense"

    def _weight_autograd(self) -> torch.Tensor:
        cfg = self.config
        method = self._method()
        if method == "dense":
            return self.weight
        return effective_weight(
            self.weight,
            method,
            cfg.n,
            cfg.m,
            beta=self._beta(),
            fixed_mask=self.mask if cfg.transposable else None,
            srste_decay=cfg.srste_decay,
        )

    def effective_weight(self) -> torch.Tensor:
        """The W~ the forward uses, detached (exactly N:M unless training has switched to dense)."""
        with torch.no_grad():
            return self._weight_autograd().detach()

    def generator(self, device: torch.device) -> torch.Generator:
        """This layer's MVUE generator on ``device`` (seeded from ``seed``; created on first use)."""
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[key] = gen
        return gen

    def _choose_backend(self, x: torch.Tensor, sparse: bool) -> str:
        """The backend for this input's device and compute dtype (decided once per pair)."""
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        key = (x.device, dtype, sparse)
        if key != self._backend_key:
            cfg = self.config
            if not sparse or cfg.backend == "dense":
                name = "dense"
            elif (cfg.n, cfg.m) != (2, 4):
                if cfg.backend == "cusparselt":
                    raise ValueError(f"`backend`='cusparselt' runs 2:4 only, got {cfg.n}:{cfg.m}. Use 'auto' or 'dense'.")
                name = "dense"
            else:
                # FP8 runs the sparse GEMM in e4m3, whose shape rules are stricter (multiples of 32);
                # it returns bf16/fp16, so a float32 input is judged (and refused) as float32.
                fp8_ok = cfg.fp8 and dtype in (torch.float16, torch.bfloat16)
                gemm_dtype = torch.float8_e4m3fn if fp8_ok else dtype
                name, _ = backends.select_backend(cfg.backend, self.weight, gemm_dtype)
            self.backend_name, self._backend_key = name, key
        return self.backend_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._weight_autograd()
        bias = self.bias
        sparse = self._method() != "dense"
        mvue = self.config.mvue if sparse else None
        fp8 = self.config.fp8 and sparse
        backend = self._choose_backend(x, sparse)
        if mvue is None and not fp8 and backend == "dense":
            return F.linear(x, w, bias)
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            # Custom autograd functions see no autocast in backward: cast the operands here once.
            dt = torch.get_autocast_dtype(dev)
            x, w = x.to(dt), w.to(dt)
            bias = bias.to(dt) if bias is not None else None
        kwargs = dict(mvue=mvue, generator=self.generator(x.device) if mvue else None, fp8=fp8, cache=self._backend_cache)
        if backend == "cusparselt":
            # W~ is compressed once per optimizer step: the cache is keyed by the weight's version.
            self._backend_cache["key"] = (self.weight._version, self._mask_version)
            kwargs["transposable"] = self.config.transposable
        with torch.autocast(dev, enabled=False):
            return backends.get_backend(backend).linear(x, w, bias, **kwargs)

    # ----------------------------------------------------------------------------------- masks
    @torch.no_grad()
    def update_mask(self, refresh_transposable: bool = False) -> Tuple[int, int]:
        """After an optimizer step: store the current mask in the ``mask`` buffer.

        Transposable masks are kept as they are unless ``refresh_transposable``. Returns
        ``(entries flipped, entries of W~ exactly zero)``, from one projection of the weights.
        """
        cfg = self.config
        weight = self.weight.detach()
        if not cfg.sparse:
            return 0, int((weight == 0).sum())
        if cfg.transposable:
            flips = self.refresh_transposable_mask() if refresh_transposable else 0
            w_eff = weight * self.mask
        else:
            w_eff, new = masked_weight(weight, cfg.method, cfg.n, cfg.m, self._beta())
            flips = int((new != self.mask).sum())
            self.mask.copy_(new)
        return flips, int((w_eff == 0).sum())

    @torch.no_grad()
    def refresh_transposable_mask(self) -> int:
        """Recompute the transposable mask from |W| (T-STE / T-SR-STE); return the flips."""
        from ..ops.transposable import transposable_mask

        cfg = self.config
        rows, cols = self.weight.shape
        if rows % cfg.m or cols % cfg.m:
            raise ValueError(
                f"`transposable=True` needs both weight dims to be multiples of m={cfg.m}, got {tuple(self.weight.shape)}"
            )
        score = self.weight.detach().abs()
        if (cfg.n, cfg.m) == (2, 4) and cfg.transposable_method in ("auto", "exact24") and kernels.available(score):
            new = kernels.transposable24(score)
        else:
            new = transposable_mask(score.float(), cfg.n, cfg.m, method=cfg.transposable_method)
        new = new.to(self.mask.device)
        self._mask_version += 1
        flips = int((new != self.mask).sum())
        self.mask.copy_(new)
        return flips

    # ----------------------------------------------------------------------------------- convert
    def to_dense(self, effective: bool = False, as_linear: bool = False) -> nn.Module:
        """A plain `nn.Linear` (or ``Conv1D`` if this layer came from one, unless ``as_linear``)
        with the dense weight W, or with W~ when ``effective=True`` (what `sparsetrain.export` uses)."""
        w = self.effective_weight() if effective else self.weight.detach()
        w = w.clone()
        if self.source == "conv1d" and not as_linear:
            from transformers.pytorch_utils import Conv1D

            out = Conv1D(self.out_features, self.in_features)
            out.to(device=w.device, dtype=w.dtype)
            out.weight.data = w.t().contiguous()
        else:
            out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype)
            out.weight.data = w
        if self.bias is not None:
            out.bias.data = self.bias.detach().clone()
        out.weight.requires_grad_(self.weight.requires_grad)
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.config.method == "s-ste" and prefix + "beta" in state_dict:
            self._beta_ready = bool(torch.isfinite(self.beta))
        self._backend_cache.clear()  # a cached compressed weight belongs to the old weights

    def extra_repr(self) -> str:
        c = self.config
        extra = f", mvue={c.mvue}" if c.mvue else ""
        extra += ", transposable" if c.transposable else ""
        extra += ", fp8" if c.fp8 else ""
        phase = "" if self.sparse_active or not c.sparse else ", dense phase"
        return f"{super().extra_repr()}, method={c.method}, {c.n}:{c.m}{extra}, backend={self.backend_name}{phase}"
