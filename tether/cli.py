"""The `tether` command: demo, sft, reward, dpo, ppo, iterate, review, sample.

Each training command takes ``--config FILE.yaml`` and dotted overrides (``ppo.clip_range=0.1``), writes a run folder
(resolved config, metrics.jsonl, model, plot) and exits non-zero with a one-line message on bad input.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from tether import distributed
from tether.config import RunConfig, build_config
from tether.errors import Interrupted, TetherError
from tether.fields import help_text
from tether.plot import PPO_CURVES, plot_metrics

SECTIONS = {
    "demo": ["model", "sampling", "sft", "reward", "ppo", "logging", "demo"],
    "sft": ["model", "sft", "logging", "distributed"],
    "reward": ["model", "reward", "logging", "distributed"],
    "dpo": ["model", "dpo", "logging"],
    "ppo": ["model", "sampling", "ppo", "logging", "distributed"],
}
DATA_PARALLEL = ("sft", "reward", "ppo")
"""The commands that run data-parallel under torchrun (docs/scaling.md)."""
DESCRIPTIONS = {
    "demo": "Run the whole flow on the embedded arithmetic task: SFT -> preferences -> reward model -> PPO -> eval.",
    "sft": "Supervised fine-tuning on {prompt, response} JSONL (sft.data).",
    "reward": "Train a reward model on {prompt, chosen, rejected} JSONL (reward.data).",
    "dpo": "DPO: train the policy directly on {prompt, chosen, rejected} JSONL (dpo.data), no reward model.",
    "ppo": "PPO against a reward model or function (model.reward_model) or an environment (ppo.env) on {prompt} JSONL "
    "(ppo.prompts).",
    "sample": "Sample responses from a model folder.",
    "iterate": "Iterative RLHF on a finished ppo or demo run: label new samples, retrain the reward model, more PPO.",
}


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # HF_HUB_OFFLINE is the user's: Hub names may download
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _base_config(command: str) -> RunConfig:
    if command == "demo":
        from tether.demo.pipeline import demo_config

        return demo_config()
    return RunConfig()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tether", description="RLHF with PPO, tethered to a frozen reference.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SECTIONS:
        p = sub.add_parser(
            name,
            help=DESCRIPTIONS[name],
            description=DESCRIPTIONS[name],
            add_help=False,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("-h", "--help", action="store_true", help="list every config field with one line each")
        p.add_argument("--config", help="YAML file of config sections")
        if name != "demo":
            p.add_argument("--resume", metavar="RUN", help="continue the run in folder RUN from its newest checkpoint")
        p.add_argument("overrides", nargs="*", help="dotted overrides such as ppo.clip_range=0.1")
    p = sub.add_parser("iterate", help=DESCRIPTIONS["iterate"], description=DESCRIPTIONS["iterate"])
    p.add_argument("run", help="a finished `tether ppo` or `tether demo` run folder")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as iterate.rounds=2 iterate.labeller=review")
    from tether.review.command import DESCRIPTION as REVIEW, add_arguments as review_arguments

    review_arguments(sub.add_parser("review", help=REVIEW, description=REVIEW))
    p = sub.add_parser("sample", help=DESCRIPTIONS["sample"], description=DESCRIPTIONS["sample"])
    p.add_argument("model", help="a causal-LM folder (e.g. runs/demo-.../ppo/model)")
    p.add_argument("prompts", nargs="+", help="prompt texts")
    p.add_argument("-n", "--num", type=int, default=1, help="responses per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--sampler", default="", help="another sampler in tether's place: module:Class or file.py:Class")
    p.add_argument(
        "--no-chat-template", action="store_true", help="give the prompts as raw text, not as a user message"
    )
    return parser


def _split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Accept '--ppo.clip_range=0.1' as well as 'ppo.clip_range=0.1' for overrides; for the commands with options of
    their own (sample, review, iterate) only dotted names are overrides, so '--top-p=0.9' stays an option."""
    training = bool(argv) and argv[0] in SECTIONS
    known, overrides = [], []
    for arg in argv:
        name = arg.split("=", 1)[0]
        if arg.startswith("--") and "=" in arg and name != "--config" and (training or "." in name):
            overrides.append(arg[2:])
        else:
            known.append(arg)
    return known, overrides


def run(argv: list[str]) -> int:
    known, extra = _split_args(argv)
    args = _parser().parse_args(known)
    if distributed.launched_processes() > 1 and args.command not in DATA_PARALLEL:
        raise TetherError(
            f"tether {args.command} runs on one process; of the commands only {', '.join(DATA_PARALLEL)} run under "
            "torchrun with several"
        )
    if args.command == "sample":
        return _sample(args)
    if args.command == "iterate":
        return _iterate(args.run, list(args.overrides) + extra)
    if args.command == "review":
        _quiet_transformers()
        from tether.review import run_review

        return run_review(args)
    if args.help:
        resume = "" if args.command == "demo" else " | --resume RUN"
        print(f"usage: tether {args.command} [--config FILE.yaml{resume}] [section.field=value ...]\n")
        print(DESCRIPTIONS[args.command] + "\n\nconfig fields (default, meaning):")
        print(help_text(_base_config(args.command), SECTIONS[args.command]))
        return 0
    _quiet_transformers()
    from tether.trainers.common import make_run_dir, seed_everything

    resuming = bool(getattr(args, "resume", None))
    if resuming:
        config = _resume_config(args, list(args.overrides) + extra)
    else:
        config = build_config(args.config, list(args.overrides) + extra, base=_base_config(args.command))
    _join_processes(config)
    if resuming:
        run_dir, resume_from = _resume(args)
    else:
        run_dir, resume_from = make_run_dir(config, args.command), None
        _say(f"run folder: {run_dir}")
    seed_everything(config.seed)
    if args.command == "demo":
        from tether.demo.pipeline import run_demo

        run_demo(config, run_dir)
    elif args.command == "sft":
        from tether.trainers.sft import train_sft

        path = train_sft(config, run_dir, echo=_say, resume_from=resume_from)
        _plot(run_dir, ["sft/loss", "sft/token_accuracy", "sft/lr"])
        _say(f"model: {path}")
    elif args.command == "reward":
        from tether.trainers.reward import train_reward

        path, _ = train_reward(config, run_dir, echo=_say, resume_from=resume_from)
        _plot(run_dir, ["rm/loss", "rm/accuracy", "rm/margin", "rm/eval_accuracy", "rm/eval_margin"])
        _say(f"model: {path}")
    elif args.command == "dpo":
        from tether.trainers.dpo import CURVES, train_dpo

        path = train_dpo(config, run_dir, resume_from=resume_from)
        _plot(run_dir, CURVES)
        print(f"model: {path}")
    elif args.command == "ppo":
        _ppo(config, run_dir, resume_from)
    return 0


def _say(text: str) -> None:
    """Print, on rank 0 only under torchrun."""
    if distributed.is_main():
        print(text)


def _join_processes(config: RunConfig) -> None:
    """Under torchrun: join the process group, on the backend that suits the models' device."""
    from tether.precision import resolve_device

    device = resolve_device(config.model.device)
    cfg = config.distributed
    distributed.check_strategy(cfg.strategy)
    distributed.init(cfg.backend, device.type, cfg.timeout_minutes)


def _resume_config(args, overrides: list[str]) -> RunConfig:
    """``tether CMD --resume RUN``: RUN's saved config, plus any overrides."""
    run_dir = Path(args.resume)
    if not (run_dir / "config.yaml").is_file():
        raise TetherError(f"--resume {run_dir}: not a run folder (no config.yaml)")
    if args.config:
        raise TetherError("--resume takes the run's own config.yaml; give changes as overrides instead of --config")
    return build_config(run_dir / "config.yaml", overrides)


def _resume(args) -> tuple[Path, Path]:
    """``tether CMD --resume RUN``: the run folder and its newest complete checkpoint (what a killed write left
    behind is removed first, by rank 0)."""
    from tether.checkpoint import checkpoint_command, clean_partial
    from tether.trainers.common import newest_checkpoint

    run_dir = Path(args.resume)
    if distributed.is_main():
        clean_partial(run_dir / "checkpoints")
    distributed.barrier()
    found = newest_checkpoint(run_dir)
    if found is None:
        raise TetherError(
            f"--resume {run_dir}: no complete checkpoint under {run_dir / 'checkpoints'}; start it again"
        )
    made_by = checkpoint_command(found)
    if made_by != args.command:
        raise TetherError(
            f"--resume {run_dir}: its checkpoints are from `tether {made_by}`, not `tether {args.command}`"
        )
    _say(f"run folder: {run_dir} (resuming from {found.name})")
    return run_dir, found


def _ppo(config: RunConfig, run_dir: Path, resume_from: Path | None = None) -> None:
    from tether.data import read_records
    from tether.trainers.common import save_model
    from tether.trainers.ppo import PPOTrainer
    from tether.tracking import truncate_metrics

    prompts = [r["prompt"] for r in read_records(config.ppo.prompts, ("prompt",))]  # strings or conversations
    trainer = PPOTrainer.from_config(config)
    if resume_from is not None:
        trainer.restore(resume_from)
        if distributed.is_main():
            truncate_metrics(run_dir / "metrics.jsonl", trainer.iteration)
    trainer.train(prompts, run_dir, echo=_say)
    if trainer.saved_at != trainer.iteration:
        trainer.save(run_dir / "checkpoints")
    path = save_model(trainer.actor_critic.policy, trainer.tokenizer, run_dir / "model", trainer.placement.dtype)
    _plot(run_dir, PPO_CURVES)
    _say(f"model: {path}")


def _iterate(run: str, overrides: list[str]) -> int:
    """``tether iterate RUN``: RUN's config plus overrides; rounds written to a new run folder."""
    _quiet_transformers()
    from tether.iterate import Lineage, iterate
    from tether.trainers.common import make_run_dir, seed_everything

    source = Path(run)
    if not (source / "config.yaml").is_file():
        raise TetherError(f"{source}: not a run folder (no config.yaml)")
    config = build_config(source / "config.yaml", ["output_dir=", *overrides])
    lineage = Lineage.of_run(source, config)
    run_dir = make_run_dir(config, "iterate")
    print(f"run folder: {run_dir}")
    seed_everything(config.seed)
    summary = iterate(config, lineage, run_dir, source)
    for r in summary["rounds"]:
        kinds = ", ".join(a["kind"] for a in r["alarms"]) or "none"
        print(
            f"round {r['round']}: {r['new_pairs']} new pairs; reward-model accuracy on held-out new pairs "
            f"{r['rm_accuracy_before']:.1%} -> {r['rm_accuracy_after']:.1%}; "
            f"PPO score {r['final']['reward/score']:+.3f}; alarms: {kinds}"
        )
    print(f"model: {summary['policy']}")
    return 0


def _plot(run_dir: Path, keys: list[str]) -> None:
    if not distributed.is_main():
        return
    plot_metrics(run_dir / "metrics.jsonl", run_dir / "curves.png", keys, title=str(run_dir))


def _sample(args) -> int:
    _quiet_transformers()
    import torch

    from tether.data import prompt_batch
    from tether.models import load_causal_lm, load_tokenizer
    from tether.precision import Placement, resolve_device
    from tether.rewards import decode_responses
    from tether.roles import load_sampler
    from tether.rollout import Sampling, generate, stop_ids
    from tether.sampling import sample

    placement = Placement(resolve_device(args.device, "--device"))
    tokenizer = load_tokenizer(args.model)
    policy = placement.frozen(load_causal_lm(args.model))
    torch.manual_seed(args.seed)
    chat = bool(getattr(tokenizer, "chat_template", None)) and not args.no_chat_template
    texts = [p for p in args.prompts for _ in range(args.num)]
    prompts = [[{"role": "user", "content": p}] for p in texts] if chat else texts
    ids, mask = map(placement.move, prompt_batch(tokenizer, prompts, 1024))
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k)
    stops = stop_ids(tokenizer, policy)
    sampler = load_sampler(args.sampler, "--sampler") or sample
    resp, resp_mask = generate(policy, ids, mask, sampling, stops, tokenizer.pad_token_id, sampler=sampler)
    for i, (prompt, text) in enumerate(zip(texts, decode_responses(tokenizer, resp, resp_mask))):
        print(("\n" if i else "") + _labelled("prompt", prompt) + "\n" + _labelled("answer", text.strip()))
    return 0


def _labelled(label: str, text: str) -> str:
    """``label: first line`` with the following lines indented under it."""
    return f"{label}: " + text.replace("\n", "\n" + " " * (len(label) + 2))


def _tether_warnings_on_one_line() -> None:
    """tether's own warnings (a setting that will not do what the user expects) as ``tether: warning: ...``; other
    libraries' keep Python's format."""
    package, python_format = str(Path(__file__).resolve().parent), warnings.formatwarning

    def formatwarning(message, category, filename, lineno, line=None):
        if str(Path(filename).resolve()).startswith(package):
            return f"tether: warning: {message}\n"
        return python_format(message, category, filename, lineno, line)

    warnings.formatwarning = formatwarning


def main(argv: list[str] | None = None) -> None:
    code = None
    _tether_warnings_on_one_line()
    try:
        code = run(sys.argv[1:] if argv is None else argv)
    except TetherError as e:
        where = f" (rank {distributed.rank()})" if distributed.rank() else ""
        if not (where and isinstance(e, Interrupted)):  # every rank stops together; rank 0 says so
            print(f"tether{where}: {e}", file=sys.stderr)
        code = e.exit_code
    except BrokenPipeError:  # e.g. `tether ppo --help | head`
        code = 0
    except KeyboardInterrupt:
        print("tether: interrupted", file=sys.stderr)
        code = 130
    finally:
        distributed.shutdown(sync=code == 0)
    distributed.leave(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
