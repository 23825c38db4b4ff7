"""Run by tests/test_distributed.py: the engine under plain-PyTorch DDP and FSDP2 on 2 CPU processes.

    python tests/dist_worker.py OUT_DIR        # spawns 2 gloo ranks; each writes OUT_DIR/rank{r}.pt

Every rank runs the same scenarios on a tiny GPT-2 (dropout 0) with a fixed global batch split
evenly between the ranks, and saves what the test compares with a single-process run of
`train` (imported from this file by the test): losses averaged over ranks, beta, metrics,
effective weights gathered to full size, the gradient before and after the engine's decay,
FSDP2's full state dict and export.
"""

from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional

import torch

WORLD = 2
STEPS = 4
GLOBAL_BATCH, SEQ, VOCAB = 4, 16, 64
LR = 1e-2


def build_model(seed: int = 0):
    """A 2-block GPT-2 whose four MLP layers (32 -> 128 -> 32) become sparse."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=SEQ, vocab_size=VOCAB, bos_token_id=0,
                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def batches(steps: int = STEPS, seed: int = 1) -> List[torch.Tensor]:
    """The global batch of every step: ``(GLOBAL_BATCH, SEQ)`` token ids."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g) for _ in range(steps)]


def _full(t: torch.Tensor) -> torch.Tensor:
    gather = getattr(t, "full_tensor", None)
    return (gather() if callable(gather) else t).detach().clone()


def _world() -> tuple:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train(model, sparsity, opt, data: List[torch.Tensor], record_weights: bool = False) -> Dict[str, object]:
    """Train on ``data`` (global batches; each rank takes its contiguous slice) and record the run.

    The gradient each sparse layer has before and after the engine's pre-step rules is captured
    with two optimizer pre-hooks, one registered before `attach` and one after it (hooks run in
    the order they were registered)."""
    import torch.distributed as dist

    rank, world = _world()
    grads = {"before": [], "after": [], "weight": []}
    layers = sparsity.layers

    def snap(key):
        def hook(optimizer, args, kwargs):
            grads[key].append({n: _full(layer.weight.grad) for n, layer in layers})
            if key == "before":
                grads["weight"].append({n: _full(layer.weight) for n, layer in layers})
        return hook

    h_before = opt.register_step_pre_hook(snap("before"))
    sparsity.attach(opt, max_steps=len(data))
    h_after = opt.register_step_pre_hook(snap("after"))
    out = {"beta": {n: layer.beta.clone() for n, layer in layers}, "loss": [], "metrics": [], "weights": []}
    transposable = sparsity.config.transposable
    out["masks"] = [{n: layer.mask.clone() for n, layer in layers}] if transposable else []
    per_rank = GLOBAL_BATCH // world
    for x in data:
        x = x[rank * per_rank:(rank + 1) * per_rank]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.detach()
        if world > 1:
            dist.all_reduce(loss)  # equal token counts per rank: the mean of means is the global mean
            loss /= world
        out["loss"].append(float(loss))
        out["metrics"].append(dict(sparsity.metrics))
        if transposable:
            out["masks"].append({n: layer.mask.clone() for n, layer in layers})
        if record_weights:
            out["weights"].append({n: _full(layer.weight) for n, layer in layers})
    h_before.remove()
    h_after.remove()
    sparsity.detach()
    out["effective"] = {n: layer.effective_weight().clone() for n, layer in layers}
    out["grads"] = grads
    return out


def _config(**kw):
    import sparsetrain as st

    return st.SparsityConfig(targets="mlp", seed=0, backend="dense", **kw)


SCENARIOS = {
    "sste": dict(method="s-ste"),
    "sste_mvue": dict(method="s-ste", mvue="exact"),
    "srste": dict(method="sr-ste"),
    "tsrste": dict(method="sr-ste", transposable=True, mask_update_interval=2),
}


def _ddp_run(name: str, data) -> Dict[str, object]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    import sparsetrain as st

    rank, _ = _world()
    torch.manual_seed(100 + rank)
    model = build_model(seed=rank)  # different inits per rank: DDP broadcasts rank 0's
    sparsity = st.Sparsifier(model, _config(**SCENARIOS[name]))
    ddp = DDP(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=LR)
    return train(ddp, sparsity, opt, data)


def _mvue_local_grads(data) -> Dict[str, torch.Tensor]:
    """One backward of the *same* batch on every rank, without DDP's all-reduce: the local dW."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import sparsetrain as st

    model = build_model()
    sparsity = st.Sparsifier(model, _config(method="s-ste", mvue="exact"))
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.0)
    sparsity.attach(opt)
    x = data[0][:2]
    with ddp.no_sync():
        ddp(input_ids=x, labels=x).loss.backward()
    sparsity.detach()
    return {n: layer.weight.grad.clone() for n, layer in sparsity.layers}


def _fsdp_run(name: str, data, finish: bool = False, dtype=torch.float32) -> Dict[str, object]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    import sparsetrain as st

    model = build_model().to(dtype)
    sparsity = st.Sparsifier(model, _config(**SCENARIOS[name]))
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    out = train(model, sparsity, opt, data, record_weights=True)
    out["sharded"] = sparsity.sharded
    out["local_rows"] = {n: tuple(layer.weight.to_local().shape) for n, layer in sparsity.layers}
    if finish:
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        out["full_state_dict"] = {k: v.detach().clone() for k, v in full.items()}
        try:
            st.export(model)
            out["export_copy_error"] = None
        except Exception as err:  # the test checks the message
            out["export_copy_error"] = f"{type(err).__name__}: {err}"
        exported = st.export(model, inplace=True)
        out["export"] = {k: _full(v) for k, v in exported.state_dict().items()}
        with torch.no_grad():
            out["export_logits"] = exported(input_ids=data[0]).logits.clone()
        out["export_sparse_left"] = len(st.sparse_layers(exported))
    return out


def _fsdp_transposable_error() -> str:
    """T-SR-STE under FSDP2 is refused at `attach` (a 4 x 4 tile may span two ranks' rows)."""
    from torch.distributed.fsdp import fully_shard

    import sparsetrain as st

    model = build_model()
    sparsity = st.Sparsifier(model, _config(**SCENARIOS["tsrste"]))
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    try:
        sparsity.attach(torch.optim.AdamW(model.parameters(), lr=LR))
    except ValueError as err:
        return str(err)
    return "no error"


def run(rank: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'store')}", rank=rank,
                            world_size=WORLD)
    try:
        data = batches()
        res: Dict[str, Optional[object]] = {}
        res["ddp_sste"] = _ddp_run("sste", data)
        res["ddp_srste"] = _ddp_run("srste", data)
        res["ddp_tsrste"] = _ddp_run("tsrste", data)
        res["ddp_mvue"] = _ddp_run("sste_mvue", data)
        res["ddp_mvue_rerun"] = _ddp_run("sste_mvue", data)
        res["mvue_local_grads"] = _mvue_local_grads(data)
        res["fsdp_sste"] = _fsdp_run("sste", data, finish=True)
        res["fsdp_srste"] = _fsdp_run("srste", data)
        res["fsdp_sste64"] = _fsdp_run("sste", data, dtype=torch.float64)
        res["fsdp_transposable_error"] = _fsdp_transposable_error()
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(run, args=(sys.argv[1],), nprocs=WORLD)
