"""The twosimplicial command: train, evaluate and sample models with 2-simplicial attention; demo and studies.

    twosimplicial demo                                  # Match3: dot-product vs 2-simplicial, CPU, minutes
    twosimplicial train configs/cpu_smoke.toml [--set train.max_steps=50] [--resume]
    torchrun --nproc_per_node 2 -m twosimplicial.cli train configs/gpu_simplicial.toml
    twosimplicial eval runs/cpu_smoke [--out eval.json]
    twosimplicial generate runs/cpu_smoke --prompt "def fib(n):" --max-new-tokens 64
    twosimplicial sweep configs/scaling.toml [--dry-run] [--time-budget 540]   # the scaling study's grid
    twosimplicial fit results/scaling                   # power-law fits, intervals, plots
    twosimplicial study match3 [--preset gpu]           # Match3 learned, multi-seed
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shlex
import sys
import textwrap
import tomllib

# Errors that mean "the input was wrong" (a bad config value, a missing file, a run directory in
# the wrong state): main() prints them as one line and exits 2. Anything else is a bug and keeps
# its traceback (as do these with TWOSIMPLICIAL_DEBUG=1).
USER_ERRORS = (ValueError, TypeError, OSError, tomllib.TOMLDecodeError)


def _resume_command(argv: list[str]) -> str:
    return shlex.join(["twosimplicial", *argv, *([] if "--resume" in argv else ["--resume"])])


def _train(args) -> int:
    from .train import TrainingInterrupted, latest_checkpoint, load_config, train
    cfg = load_config(args.config, args.set)
    if args.out_dir:
        cfg["run"]["out_dir"] = args.out_dir
    import torch.distributed as dist
    try:
        summary = train(cfg, resume=args.resume)
    except TrainingInterrupted as e:
        print(f"twosimplicial: interrupted after step {e.step}; checkpoint {e.checkpoint}\n"
              f"  resume with: {_resume_command(args.argv)}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:                         # several processes, or a second Ctrl-C
        if not dist.is_initialized() or dist.get_rank() == 0:
            ck = latest_checkpoint(cfg["run"]["out_dir"])
            print(f"twosimplicial: interrupted; last checkpoint: {ck or 'none'}"
                  + (f"\n  resume with: {_resume_command(args.argv)}" if ck else ""), file=sys.stderr)
        return 130
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps({k: summary.get(k) for k in ("step", "train_loss", "tokens_per_s", "run_dir")}))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def _eval(args) -> int:
    from .evaluate import evaluate_run
    res = evaluate_run(args.run_dir, out=args.out, device=args.device, max_tokens=args.max_tokens,
                       math_problems_n=args.math_problems, match3_batches=args.match3_batches,
                       humaneval=not args.no_humaneval)
    print(json.dumps(res, indent=2))
    return 0


def _generate(args) -> int:
    import torch

    from ._validate import resolve_device
    from .generate import generate
    from .train import load_model, run_corpus
    if not args.prompt:
        raise ValueError("--prompt must not be empty")
    device = resolve_device("--device", args.device)
    model, cfg = load_model(args.run_dir, device)
    if cfg["data"]["task"] != "lm":
        raise ValueError(f"{args.run_dir} is a {cfg['data']['task']!r} run: generate needs a language model")
    tok = run_corpus(args.run_dir).tokenizer
    ids = tok.encode(args.prompt).ids
    g = torch.Generator(device=device).manual_seed(args.seed)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    out = generate(model, idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   use_cache=not args.no_cache, generator=g)
    print(tok.decode(out[0].tolist()))
    return 0


# reStructuredText inline markup in docstrings reused as help text: roles and literals.
_RST_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj):`~?([^`]+)`")
_RST_LITERAL = re.compile(r"``([^`]*)``")


def _plain(text: str) -> str:
    """``text`` with its reStructuredText markup removed, for a terminal."""
    text = _RST_LITERAL.sub(r"\1", _RST_ROLE.sub(r"\1", text))
    return re.sub(r"::$", ":", text, flags=re.MULTILINE)


def _shows_default(action: argparse.Action) -> bool:
    """An option whose help should end with its default: not a flag, not a positional, a default
    worth printing, and help that does not already say what the default is."""
    if not action.option_strings or action.nargs == 0:
        return False
    if action.default in (None, argparse.SUPPRESS) or action.default == []:
        return False
    return "default" not in (action.help or "")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their line breaks; option help wraps at spaces only, so that a path or an
    option name in it (a default such as ``results/match3/demo_seeds.json``) is never split at a
    hyphen or in the middle, and can be copied from the terminal."""

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False, break_long_words=False)


def _finish_help(parser: argparse.ArgumentParser) -> None:
    """Make ``parser`` and its subcommands' help read cleanly: descriptions keep their line breaks
    (examples), reStructuredText markup is removed, and every option's default is shown."""
    parser.formatter_class = _HelpFormatter
    if parser.description:
        parser.description = _plain(parser.description)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                choice.help = _plain(choice.help) if choice.help else choice.help
            for sub in {id(p): p for p in action.choices.values()}.values():
                _finish_help(sub)
            continue
        if action.help is argparse.SUPPRESS:
            continue
        help = _plain(action.help) if action.help else action.help
        if _shows_default(action):
            help = f"{help} (default: %(default)s)" if help else "default: %(default)s"
        action.help = help


def _version() -> str:
    import torch

    from . import __version__
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = "not installed"
    return f"twosimplicial {__version__} (torch {torch.__version__}, triton {triton})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="twosimplicial", description=__doc__)
    p.add_argument("--version", action="version", version=_version(),
                   help="print the version of twosimplicial, torch and triton, and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from . import demo
    demo.add_parser(sub)

    t = sub.add_parser("train", help="train from a TOML config",
                       description="Train a model from a TOML config into its run directory (run.out_dir); "
                                   "see configs/ for examples.")
    t.add_argument("config", help="TOML config: [run], [model], [data] and [train] tables")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config entry (repeatable), e.g. --set train.lr=1e-3")
    t.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    t.add_argument("--out-dir", default=None,
                   help="shortcut for --set run.out_dir=... (default: the config's run.out_dir)")
    t.set_defaults(fn=_train)

    e = sub.add_parser("eval", help="evaluate a run directory's latest checkpoint (JSON)",
                       description="Score a run's latest intact checkpoint: held-out code, HumanEval and math "
                                   "NLL for language models, accuracy for Match3; prints and writes JSON.")
    e.add_argument("run_dir", help="the run directory (twosimplicial train's run.out_dir)")
    e.add_argument("--out", default=None, help="JSON path (default: <run_dir>/eval.json)")
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda when available, else cpu")
    e.add_argument("--max-tokens", type=int, default=200_000, help="held-out code tokens to score")
    e.add_argument("--math-problems", type=int, default=200, help="held-out math problems to score")
    e.add_argument("--match3-batches", type=int, default=20, help="Match3 batches to score (Match3 runs)")
    e.add_argument("--no-humaneval", action="store_true", help="skip the HumanEval NLL")
    e.set_defaults(fn=_eval)

    from .studies import fit, lr_check, match3, scaling
    scaling.add_parser(sub)
    fit.add_parser(sub)
    st = sub.add_parser("study", help="small studies of what 2-simplicial attention buys (results under results/)",
                        description="Small studies of what 2-simplicial attention buys; results under results/.")
    studies = st.add_subparsers(dest="study", required=True, metavar="STUDY")
    match3.add_parser(studies)
    lr_check.add_parser(studies)

    g = sub.add_parser("generate", help="sample a continuation from a trained language model",
                       description="Sample a continuation of --prompt from a language-model run's latest intact "
                                   "checkpoint, with its own tokenizer.")
    g.add_argument("run_dir", help="the run directory of a language-model run")
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to sample")
    g.add_argument("--temperature", type=float, default=0.8, help="divides the logits; 0 = greedy")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: all)")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    g.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda when available, else cpu")
    g.set_defaults(fn=_generate)
    _finish_help(p)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.fn(args)
    except USER_ERRORS as e:
        if os.environ.get("TWOSIMPLICIAL_DEBUG"):
            raise
        msg = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.strerror}: {e.filename}"
        print(f"twosimplicial: error: {' '.join(msg.split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("twosimplicial: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
