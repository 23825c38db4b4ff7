"""``sparsetrain prune``: one-shot N:M pruning of a saved model, with perplexity before and after.

Example:
    sparsetrain prune --model exported/tiny-dense --method prox --out pruned/tiny-prox
    sparsetrain prune --model runs/tiny-dense/run_0 --method wanda+refine \\
        --data 'notes/**/*.txt' --out pruned/tiny-wanda

``--model`` is a ``save_pretrained`` directory, a run directory of ``sparsetrain fit`` (its newest
readable checkpoint) or one of its checkpoints (exported first with `sparsetrain.cli.export_checkpoint`). Text comes from ``--data`` (files or
globs) or, by default, the Python standard library's source. It is tokenised with the model
directory's tokenizer if it has one, else byte-level. Documents are split as ``sparsetrain fit``
splits them (the data module's default seeded hash of each document's index): the first
``--calib-seqs`` sequences of the training documents calibrate, and the first ``--eval-seqs`` of
the test documents measure perplexity, as ``sparsetrain test`` does. A corpus of a few files may
have too few test documents; then the end of the training text is held out instead, and the output
says so.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .prune import PRUNE_METHODS, prune

__all__ = ["main", "load_model", "split_token_streams", "token_stream", "perplexity"]

# prox always ends with masked refinement, so "prox+refine" is no separate choice (still accepted).
_METHOD_CHOICES = [c for b in PRUNE_METHODS for c in ((b,) if b == "prox" else (b, b + "+refine"))]

_TABLE_HELP = """\
The table printed after pruning has one line per layer:
  layer    qualified name of the pruned Linear / Conv1D
  shape    out x in features of its weight
  tokens   calibration tokens its input statistics H = X^T X were taken over
  rel.err  ||X (W - W^)^T|| / ||X W^T|| on the calibration data, after refinement (lower is better)
  before   the same error right after the mask was chosen, before refinement
  refine   refinement iterations run on the layer (0 without refinement)
  prox it  prox iterations until every group was N:M (prox only)
  cap      whether prox stopped at its iteration cap and was projected onto N:M (prox only)
  time s   seconds spent on the layer"""


class _OneLineErrors(argparse.ArgumentParser):
    """An argument error is one line naming the problem, not the whole usage block."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message}\n  (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def _has_tokenizer(d: Path) -> bool:
    return any((d / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model"))


def load_model(path: str, tmp: Path):
    """``(model, model directory)`` from a ``save_pretrained`` directory or a training checkpoint."""
    from transformers import AutoModelForCausalLM

    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"`--model` {path!r} does not exist")
    if p.is_file() or (p / "checkpoints").is_dir():  # a checkpoint, or a run directory
        from ..hub import export_checkpoint

        export_checkpoint(str(p), str(tmp))
        p = tmp
    return AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32), p


def _split_defaults() -> Dict[str, float]:
    """The document split of `TextDataModule` (and so of ``sparsetrain fit`` / ``test``) by default."""
    import inspect

    from ..data import TextDataModule

    params = inspect.signature(TextDataModule.__init__).parameters
    return {k: params[k].default for k in ("split_seed", "val_fraction", "test_fraction")}


def _tokenizer(model_dir: Path, vocab_size: int):
    from ..data import ByteTokenizer, load_hf_tokenizer

    tok = load_hf_tokenizer(str(model_dir)) if _has_tokenizer(model_dir) else ByteTokenizer()
    if tok.vocab_size > vocab_size:
        raise ValueError(
            f"The tokenizer ({tok.name}, {tok.vocab_size} tokens) does not fit the model's vocabulary of "
            f"{vocab_size}; save a tokenizer with the model (`--model` directory)"
        )
    return tok


def _documents(data: Optional[Sequence[str]], max_bytes: int):
    from ..data import stdlib_files
    from ..data.sources import iter_file_documents, local_files

    return iter_file_documents(local_files(data) if data else stdlib_files(), max_bytes=max_bytes)


def split_token_streams(model_dir: Path, vocab_size: int, data: Optional[Sequence[str]], max_bytes: int):
    """``({"train", "val", "test": token ids}, tokenizer)``: the text's documents split as
    ``sparsetrain fit`` splits them by default (a seeded hash of each document's index,
    `sparsetrain.data.corpus.split_of`), each split's documents concatenated with an end-of-text
    token after each.
    """
    from ..data.corpus import split_of

    tok = _tokenizer(model_dir, vocab_size)
    d = _split_defaults()
    ids: Dict[str, List[int]] = {"train": [], "val": [], "test": []}
    for index, doc in enumerate(_documents(data, max_bytes)):
        out = ids[split_of(index, d["split_seed"], d["val_fraction"], d["test_fraction"])]
        out.extend(tok.encode(doc))
        out.append(tok.eot_id)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in ids.items()}, tok


def token_stream(model_dir: Path, vocab_size: int, data: Optional[Sequence[str]], max_bytes: int):
    """The concatenated token ids of all the text, in order (an end-of-text token after each document)."""
    tok = _tokenizer(model_dir, vocab_size)
    ids: List[int] = []
    for doc in _documents(data, max_bytes):
        ids.extend(tok.encode(doc))
        ids.append(tok.eot_id)
    return torch.tensor(ids, dtype=torch.long), tok


def perplexity(model, seqs: torch.Tensor, batch_size: int) -> float:
    """``exp`` of the mean next-token cross-entropy over ``seqs`` ``[N, T]``."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            x = seqs[i:i + batch_size]
            logits = model(x, use_cache=False).logits[:, :-1]  # (B, T-1, V)
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                    x[:, 1:].reshape(-1), reduction="sum")
            total += float(nll)
            count += x[:, 1:].numel()
    return math.exp(total / count)


def _parser() -> argparse.ArgumentParser:
    p = _OneLineErrors(
        prog="sparsetrain prune",
        description="One-shot N:M pruning (magnitude, Wanda, SparseGPT, 2:4 prox) of a trained causal LM, "
                    "with perplexity on held-out text before and after.",
        epilog=_TABLE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True,
                   help="save_pretrained directory, `sparsetrain fit` run directory, or one of its .ckpt files")
    p.add_argument("--out", required=True, help="output save_pretrained directory (created)")
    p.add_argument("--method", default="prox", choices=_METHOD_CHOICES,
                   help="how masks are chosen; '+refine' adds masked gradient refinement "
                        "(prox always refines) (default: prox)")
    p.add_argument("--data", nargs="*", default=None, help="text files or globs (default: Python stdlib source)")
    p.add_argument("--n", type=int, default=2, help="keep n weights of every m consecutive ones along the input dim "
                                                    "(default: 2)")
    p.add_argument("--m", type=int, default=4, help="group size m of the N:M pattern (default: 4; prox needs 2:4)")
    p.add_argument("--refine-steps", type=int, default=1000,
                   help="masked refinement iterations per layer, for prox and '+refine' methods; 0 turns "
                        "refinement off (default: 1000)")
    p.add_argument("--targets", default=None, help="regex of layer names (default: every Linear/Conv1D in the blocks)")
    p.add_argument("--transposable", action="store_true", help="N:M along rows and columns of every m x m tile")
    p.add_argument("--calib-seqs", type=int, default=32, help="calibration sequences (default: 32)")
    p.add_argument("--eval-seqs", type=int, default=32, help="sequences of the test split (held-out documents) for perplexity; 0 skips it (default: 32)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence, capped at the model's context "
                                                          "length (default: 256)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="sequences per forward pass, for calibration and perplexity (default: 8)")
    p.add_argument("--max-bytes", type=int, default=4_000_000, help="text read at most (bytes)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice). On a busy machine 1 can be much faster: "
                        "the prox loop runs thousands of small matmuls")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``sparsetrain prune``; returns the exit code."""
    from ..config import check_nm

    p = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = ["prox" if a == "prox+refine" else a.replace("=prox+refine", "=prox") for a in argv]
    args = p.parse_args(argv)
    try:  # before anything is loaded
        check_nm(args.n, args.m)
        if args.method.startswith("prox") and (args.n, args.m) != (2, 4):
            raise ValueError(f"`--method prox` is a 2:4 method; got --n {args.n} --m {args.m} (use wanda, "
                             "sparsegpt or magnitude for other N:M)")
    except (TypeError, ValueError) as e:
        p.error(str(e).replace("`n`", "`--n`").replace("`m`", "`--m`"))
    if args.refine_steps < 0:
        p.error(f"`--refine-steps` must be >= 0, got {args.refine_steps}")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" / "Loading weights" bars say nothing here
    for name in ("calib_seqs", "seq_len", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"`--{name.replace('_', '-')}` must be >= 1, got {getattr(args, name)}")
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"`--threads` must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            model, model_dir = load_model(args.model, Path(tmp))
            ctx = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
            t = min(args.seq_len, ctx) if ctx else args.seq_len
            streams, tok = split_token_streams(model_dir, model.config.vocab_size, args.data, args.max_bytes)
            ids, test_ids = streams["train"], streams["test"]
        except ValueError as e:
            p.error(str(e))
        n_seq, n_test = len(ids) // t, len(test_ids) // t
        seqs = ids[: n_seq * t].reshape(n_seq, t)  # (N, T)
        if n_test >= args.eval_seqs:
            # The documents `sparsetrain fit` held out for `sparsetrain test` (the data module's
            # default split): never trained on, never calibrated on.
            held_out = test_ids[: n_test * t].reshape(n_test, t)[: args.eval_seqs]
            where = "the test split (the data module's held-out documents, as in `sparsetrain test`)"
            need, room = args.calib_seqs, n_seq
        else:
            # Too few documents hashed to the test split (a corpus of a few files): as the data
            # module does then, hold out the end of the training text, apart from calibration.
            held_out = seqs[n_seq - args.eval_seqs:] if args.eval_seqs else seqs[:0]
            where = (f"the end of the training text (the test split has {n_test} sequence(s) of {t} tokens, "
                     f"fewer than --eval-seqs {args.eval_seqs}); not comparable with `sparsetrain test`")
            need, room = args.calib_seqs + args.eval_seqs, n_seq
        if room < need:
            p.error(f"the text gives {room} training sequences of {t} tokens, fewer than the {need} needed "
                    f"(--calib-seqs{' + --eval-seqs' if need > args.calib_seqs else ''})")
        calib = seqs[: args.calib_seqs]
        print(f"model {args.model}: {sum(p_.numel() for p_ in model.parameters()) / 1e6:.2f}M parameters; "
              f"{len(calib)} calibration sequences (training split) and {len(held_out)} held-out sequences of "
              f"{t} tokens ({tok.name})")
        if len(held_out):
            print(f"perplexity on {where}")
        split_name = "test" if n_test >= args.eval_seqs else "train (end)"
        ppl_before = perplexity(model, held_out, args.batch_size) if len(held_out) else None
        if ppl_before is not None:
            print(f"perplexity before: {ppl_before:.3f} ({split_name} split)")
        batches = [calib[i:i + args.batch_size] for i in range(0, len(calib), args.batch_size)]
        try:
            report = prune(model, batches, method=args.method, n=args.n, m=args.m, refine_steps=args.refine_steps,
                           targets=args.targets, transposable=args.transposable, progress=True)
        except ValueError as e:
            p.error(str(e))
        print(report.table())
        ppl_after = perplexity(model, held_out, args.batch_size) if len(held_out) else None
        if ppl_after is not None:
            print(f"perplexity after: {ppl_after:.3f} (before {ppl_before:.3f}; {split_name} split)")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        _set_pruned_metadata(model, report, args)
        model.save_pretrained(out)
        for f in Path(model_dir).iterdir():  # keep the tokenizer next to the weights
            if f.is_file() and (f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "vocab.json",
                                                                             "merges.txt")):
                shutil.copy(f, out / f.name)
        info = {"model": str(args.model), "method": args.method, "n": args.n, "m": args.m,
                "perplexity_before": ppl_before, "perplexity_after": ppl_after, "perplexity_split": split_name,
                "seq_len": t,
                "calib_seqs": len(calib), "eval_seqs": len(held_out), "report": report.to_dict()}
        (out / "prune_report.json").write_text(json.dumps(info, indent=1))
        print(f"wrote {out}")
    return 0


def _set_pruned_metadata(model, report, args) -> None:
    """Replace the ``"sparsetrain"`` entry of the model's config (a `sparsetrain export` carries the
    training run's) with one that describes the pruned weights: the pruning method, the pruned
    layers and their zero fractions, measured on the weights about to be saved."""
    from ..hub import METADATA_KEY, nm_violations, sparsity_metadata
    from ..targets import layer_weight

    previous = getattr(model.config, METADATA_KEY, None)
    names = [layer.name for layer in report.layers]
    meta = sparsity_metadata(model, names, {"method": f"prune:{args.method}", "n": args.n, "m": args.m,
                                            "targets": args.targets or "every Linear/Conv1D in the decoder blocks"},
                             None)
    meta["nm_verified"] = bool(names) and all(
        nm_violations(layer_weight(model.get_submodule(nm)), args.n, args.m) == 0 for nm in names)
    meta["global_step"] = (previous or {}).get("global_step")  # of the training run, if it said
    meta["tokenizer"] = (previous or {}).get("tokenizer")
    meta["pruned_from"] = str(args.model)
    if previous:
        meta["trained_with"] = {k: previous.get(k) for k in ("method", "n", "m", "targets")}
    setattr(model.config, METADATA_KEY, meta)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
