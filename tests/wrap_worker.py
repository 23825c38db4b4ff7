"""Run by tests/test_engine_reliability.py: `Sparsifier` after DDP / `fully_shard` on a 1-process
gloo group (a fresh process, so no test shares its process group). Prints one line per case."""

import os
import sys
import tempfile

import torch
import torch.distributed as dist


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=8, vocab_size=64))


def case(name, fn):
    try:
        fn()
        print(f"{name}: ok")
    except ValueError as err:
        print(f"{name}: ValueError: {err}")


def main() -> None:
    import sparsetrain as st
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    store = os.path.join(tempfile.mkdtemp(), "store")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        case("ddp_passed", lambda: st.Sparsifier(DDP(gpt2()), method="ste"))

        class Holder(torch.nn.Module):  # e.g. a LightningModule-like wrapper whose `.module` is DDP
            def __init__(self):
                super().__init__()
                self.module = DDP(gpt2())

        case("ddp_inside", lambda: st.Sparsifier(Holder(), method="ste"))

        def sharded():
            model = gpt2()
            fully_shard(model)
            st.Sparsifier(model, method="s-ste")

        case("fully_shard_first", sharded)

        def right_order():
            model = gpt2()
            sparsity = st.Sparsifier(model, method="s-ste")
            ddp = DDP(model)
            opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
            sparsity.attach(opt)
            x = torch.randint(0, 64, (2, 8))
            ddp(input_ids=x, labels=x).loss.backward()
            opt.step()

        case("right_order", right_order)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
