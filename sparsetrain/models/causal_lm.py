"""`CausalLMModule`: pre-train a `transformers` causal LM from scratch with Lightning.

Example:
    >>> module = CausalLMModule(model_type="gpt2", vocab_size=257, n_layer=2, n_head=2, n_embd=64, block_size=64)
    >>> x = torch.randint(0, 257, (4, 64))
    >>> module(x).shape                      # (B, T, padded vocab)
    torch.Size([4, 64, 320])
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from .schedule import warmup_cosine_lr

log = logging.getLogger(__name__)

MODEL_TYPES = ("gpt2", "llama")


def build_hf_config(
    model_type: str,
    vocab_size: int,
    n_layer: int,
    n_head: int,
    n_embd: int,
    block_size: int,
    n_inner: Optional[int],
    n_kv_head: Optional[int],
    dropout: float,
    tie_word_embeddings: Optional[bool],
    extra: dict,
    activation: Optional[str] = None,
):
    """A `transformers` config from architecture-neutral sizes (each family names them differently).

    ``activation`` is the FFN's activation as a `transformers` ``ACT2FN`` name (``"relu2"``: squared
    ReLU, ``"gelu_new"``, ``"silu"``, ...); None keeps the family's own (GPT-2: ``gelu_new``,
    Llama: ``silu`` in its gated MLP). GPT-2 calls the field ``activation_function``, Llama ``hidden_act``.
    """
    from transformers import AutoConfig
    from transformers.activations import ACT2FN

    if activation is not None and activation not in ACT2FN:
        raise ValueError(
            f"Unknown `activation`={activation!r}; valid choices: None (the family's default) or a "
            f"transformers ACT2FN name, e.g. 'relu2' (squared ReLU), 'gelu_new', 'silu', 'relu'"
        )

    if model_type == "gpt2":
        kw = dict(
            n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=block_size, n_inner=n_inner,
            resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        )
        if activation is not None:
            kw["activation_function"] = activation
        if n_kv_head is not None:
            raise ValueError("`n_kv_head` (grouped-query attention) is for model_type='llama', not 'gpt2'")
    elif model_type == "llama":
        kw = dict(
            num_hidden_layers=n_layer, num_attention_heads=n_head, hidden_size=n_embd,
            max_position_embeddings=block_size, num_key_value_heads=n_kv_head or n_head,
            # Llama's SwiGLU has three matrices; 8/3 * d keeps parameters equal to a 4d GELU MLP.
            intermediate_size=n_inner or 64 * math.ceil(8 * n_embd / 3 / 64),
            attention_dropout=dropout,
        )
        if activation is not None:
            kw["hidden_act"] = activation  # the gate's activation: down_proj sees act(gate) * up
    else:
        raise ValueError(f"Unknown `model_type`={model_type!r}; valid choices: {', '.join(map(repr, MODEL_TYPES))}")
    if tie_word_embeddings is not None:
        kw["tie_word_embeddings"] = tie_word_embeddings
    # The families' default bos/eos ids (GPT-2's 50256) mean nothing for our vocabularies; the data
    # module's end-of-text token separates documents instead.
    kw.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    kw.update(extra)
    return AutoConfig.for_model(model_type, vocab_size=vocab_size, **kw)


class CausalLMModule(L.LightningModule):
    """Causal-LM pre-training of a freshly initialised `transformers` model (nothing is downloaded).

    Batches are ``(x, y)`` token tensors of shape ``(B, T)`` with ``y`` the next token of ``x``
    (see `sparsetrain.data.TextDataModule`). The loss is the mean cross-entropy over all B*T targets.

    Logged: ``train/loss``, ``train/ppl``, ``train/tokens_per_s``, ``lr`` every step; ``val/loss`` and
    ``val/ppl`` (token-weighted over the whole split, with torchmetrics) per validation run; the same
    under ``test/`` for ``sparsetrain test``. Gradient clipping and bf16/fp16 come from the Trainer
    (``gradient_clip_val``, ``precision``).

    Args:
        model_type: ``"gpt2"`` or ``"llama"``.
        vocab_size: tokens the data can produce (linked from the data module by the CLI).
        n_layer, n_head, n_embd: depth, attention heads and width.
        block_size: context length (linked from the data module by the CLI).
        n_inner: feed-forward width (default 4 * n_embd for GPT-2, ~8/3 * n_embd rounded to 64 for Llama).
        n_kv_head: key/value heads for grouped-query attention (Llama only; default n_head).
        dropout: dropout probability (0 for pre-training, as nanoGPT does for single-epoch runs).
        tie_word_embeddings: share the input embedding and the output head (default: the family's default).
        pad_vocab_to: the embedding has ``vocab_size`` rounded up to a multiple of this (64: faster
            matmuls, as nanoGPT's 50304); the extra rows are never targets.
        activation: the FFN activation, a `transformers` ``ACT2FN`` name; ``"relu2"`` (squared ReLU)
            makes the down-projection's input mostly exact zeros, which 2:4 activations
            (``SparsityConfig.activation_sparsity``) exploit. None: the family's default.
        hf_config: further fields passed to the `transformers` config as they are.
        lr: peak learning rate, reached after ``warmup_steps``.
        min_lr: the learning rate cosine decay ends at.
        warmup_steps: steps of linear warmup.
        lr_decay_steps: the step where decay reaches ``min_lr`` (default: the Trainer's ``max_steps``).
        weight_decay: AdamW decay of matrices; biases, norm weights and embeddings get none.
        betas: AdamW betas.
        eps: AdamW epsilon.
        fused: use the fused AdamW kernel (CUDA).
    """

    def __init__(
        self,
        model_type: str = "gpt2",
        vocab_size: int = 257,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        block_size: int = 256,
        n_inner: Optional[int] = None,
        n_kv_head: Optional[int] = None,
        dropout: float = 0.0,
        tie_word_embeddings: Optional[bool] = None,
        activation: Optional[str] = None,
        pad_vocab_to: int = 64,
        hf_config: Optional[dict[str, Any]] = None,
        lr: float = 1e-3,
        min_lr: float = 1e-4,
        warmup_steps: int = 100,
        lr_decay_steps: Optional[int] = None,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        fused: bool = False,
    ) -> None:
        super().__init__()
        for name, v in (("vocab_size", vocab_size), ("n_layer", n_layer), ("n_head", n_head), ("n_embd", n_embd),
                        ("block_size", block_size), ("pad_vocab_to", pad_vocab_to)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {v!r}")
        if n_embd % n_head != 0:
            raise ValueError(f"`n_embd`={n_embd} must be a multiple of `n_head`={n_head}")
        if not 0 <= min_lr <= lr:
            raise ValueError(f"Need 0 <= `min_lr` <= `lr`, got min_lr={min_lr!r}, lr={lr!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be an int >= 0, got {warmup_steps!r}")
        if lr_decay_steps is not None and lr_decay_steps < warmup_steps:
            raise ValueError(f"`lr_decay_steps`={lr_decay_steps} must be >= `warmup_steps`={warmup_steps}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}")
        self.save_hyperparameters()
        from transformers import AutoModelForCausalLM

        padded = pad_vocab_to * math.ceil(vocab_size / pad_vocab_to)
        self.config = build_hf_config(
            model_type, padded, n_layer, n_head, n_embd, block_size, n_inner, n_kv_head, dropout,
            tie_word_embeddings, dict(hf_config or {}), activation=activation,
        )
        # from_config initialises fresh weights (the family's own init, e.g. GPT-2's scaled residual projections).
        self.model = AutoModelForCausalLM.from_config(self.config)
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self._last_step_time: Optional[float] = None

    # ------------------------------------------------------------------------------ forward & loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, T, padded vocab)`` for tokens ``x`` ``(B, T)``."""
        return self.model(input_ids=x, use_cache=False).logits

    def _loss(self, batch) -> tuple[torch.Tensor, int]:
        x, y = batch  # (B, T) each
        logits = self(x)  # (B, T, V)
        # float32 cross-entropy: a bf16 log-softmax over 50k classes loses the small probabilities.
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
        return loss, y.numel()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, n_tokens = self._loss(batch)
        now = time.perf_counter()
        if self._last_step_time is not None:
            # Time from the previous step's start: forward, backward, optimizer and data loading.
            tokens = n_tokens * self.trainer.world_size
            self.log("train/tokens_per_s", tokens / max(now - self._last_step_time, 1e-9), on_step=True,
                     on_epoch=False)
        self._last_step_time = now
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/ppl", torch.exp(loss.detach()), on_step=True, on_epoch=False)
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def on_train_epoch_start(self) -> None:
        self._last_step_time = None

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, n_tokens = self._loss(batch)
        # Weighted by tokens, so a short last batch counts for what it holds.
        self.val_loss.update(loss, weight=n_tokens)

    def on_validation_epoch_end(self) -> None:
        mean = self.val_loss.compute()
        self.log("val/loss", mean, prog_bar=True)
        self.log("val/ppl", torch.exp(mean))
        self.val_loss.reset()

    def test_step(self, batch, batch_idx: int) -> None:
        loss, n_tokens = self._loss(batch)
        self.test_loss.update(loss, weight=n_tokens)

    def on_test_epoch_end(self) -> None:
        mean = self.test_loss.compute()
        self.log("test/loss", mean)
        self.log("test/ppl", torch.exp(mean))
        self.test_loss.reset()

    # ------------------------------------------------------------------------------ optimizer

    def param_groups(self) -> list[dict]:
        """AdamW groups: matrices decay; biases, norm weights and embeddings do not.

        Embeddings are a lookup table: decaying rows of rare tokens toward 0 only because they are
        rarely updated is not regularisation. Tied head/embedding weights count as embeddings.
        """
        embedding_ids = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        decay, no_decay, seen = [], [], set()
        for _, p in self.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if p.ndim < 2 or id(p) in embedding_ids else decay).append(p)
        return [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def decay_steps(self) -> int:
        """The step at which the cosine reaches ``min_lr``."""
        if self.hparams.lr_decay_steps is not None:
            return self.hparams.lr_decay_steps
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        if max_steps is None or max_steps < 0:
            raise ValueError(
                "Set `trainer.max_steps` (or `model.lr_decay_steps`): the learning-rate schedule needs to know "
                "where the cosine ends, and the training stream is endless"
            )
        return max_steps

    def configure_optimizers(self):
        hp = self.hparams
        # Built here, after callbacks' `setup` (SparseTraining swaps layers there, and a GPT-2
        # Conv1D becomes a new Parameter), so the optimizer holds the parameters actually trained.
        kwargs = {"fused": True} if hp.fused else {}
        opt = torch.optim.AdamW(self.param_groups(), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, **kwargs)
        decay_steps = self.decay_steps()
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: warmup_cosine_lr(step, hp.lr, hp.min_lr, hp.warmup_steps, decay_steps) / hp.lr
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
