"""The tutorial's first situation on a CPU: a game whose rule changes with the player's level. PPO plays the game
and keeps learning as the rule changes; DPO learns from preference pairs collected before the change.

    OMP_NUM_THREADS=1 python benchmarks/env_game.py --out runs/env-game --seed 0

1. SFT    a tiny GPT-2 learns high-low at level 1 from scratch (``tether.envs.games.sft_records``): the larger
          digit 85% of the time, and after the game's "no!" the digit it did not try
2. pairs  two first answers per prompt from the SFT player, played at level 1: the right one chosen, the wrong one
          rejected (and, as a control, the same collected at level 2)
3. DPO    the SFT player trained on the level-1 pairs (and on the level-2 pairs, the control)
4. PPO    the SFT player plays ``ppo.env=tether.envs.games:HighLow``: level 2, "the smaller digit", from iteration
          ``HighLow.rounds_per_level`` on
5. eval   every player plays every prompt 4 times at level 1 and at level 2 (two tries, temperature 1)

Prints a markdown table; writes ``summary.json``, the PPO metrics and ``env_game.png`` under ``--out`` (copy the PNG
to docs/ for docs/why-ppo.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from tether.config import RunConfig  # noqa: E402
from tether.data import write_jsonl  # noqa: E402
from tether.envs.episodes import episode_stats, play_episodes  # noqa: E402
from tether.envs.games import HighLow, all_prompts, sft_records  # noqa: E402
from tether.models import char_tokenizer, load_causal_lm, load_tokenizer  # noqa: E402
from tether.rollout import Sampling  # noqa: E402
from tether.tracking import read_metrics  # noqa: E402
from tether.trainers.common import seed_everything  # noqa: E402
from tether.trainers.dpo import train_dpo  # noqa: E402
from tether.trainers.ppo import PPOTrainer  # noqa: E402
from tether.trainers.sft import train_sft  # noqa: E402

CHANGE = HighLow.rounds_per_level  # PPO iterations played at level 1
SAMPLING = Sampling(max_new_tokens=3, temperature=1.0)


def base_config(seed: int) -> RunConfig:
    config = RunConfig(seed=seed)
    config.model.device = "cpu"
    config.logging.print_every = 0
    config.sft.steps, config.sft.batch_size, config.sft.lr, config.sft.warmup_steps = 600, 32, 5e-3, 50
    config.dpo.epochs, config.dpo.batch_size, config.dpo.lr, config.dpo.beta = 3, 16, 5e-4, 0.1
    config.sampling.max_new_tokens, config.sampling.temperature = SAMPLING.max_new_tokens, SAMPLING.temperature
    ppo = config.ppo
    ppo.env, ppo.max_turns, ppo.steps = "tether.envs.games:HighLow", 2, 120
    ppo.rollout_batch_size, ppo.mini_batch_size, ppo.ppo_epochs = 64, 16, 4
    ppo.lr, ppo.lr_schedule, ppo.kl_coef = 1e-4, "constant", 0.05
    return config


def play(policy, tokenizer, level: int, samples: int = 4, seed: int = 0) -> dict:
    """Every prompt ``samples`` times at ``level`` (no levelling up): mean return and first-try accuracy."""
    torch.manual_seed(seed)
    prompts = [p for p in all_prompts() for _ in range(samples)]
    envs = [HighLow(rounds_per_level=0, level=level) for _ in prompts]
    episodes = play_episodes(policy, envs, tokenizer, prompts, SAMPLING, max_turns=2)
    first = [r[0] == 1.0 for r in episodes.rewards]
    return {"return": sum(episodes.returns) / len(prompts), "first_try": sum(first) / len(prompts)}


def preference_pairs(policy, tokenizer, level: int, draws: int, seed: int) -> list[dict]:
    """First answers of the SFT player, two per prompt, played at ``level``: right chosen over wrong."""
    rng = random.Random(seed)
    prompts = [rng.choice(all_prompts()) for _ in range(draws)]
    torch.manual_seed(seed)
    twice = [p for p in prompts for _ in range(2)]
    envs = [HighLow(rounds_per_level=0, level=level) for _ in twice]
    episodes = play_episodes(policy, envs, tokenizer, twice, SAMPLING, max_turns=1)
    pairs = []
    for i, prompt in enumerate(prompts):
        (a, ra), (b, rb) = ((episodes.turns[j][0], episodes.rewards[j][0]) for j in (2 * i, 2 * i + 1))
        if ra != rb:
            chosen, rejected = (a, b) if ra > rb else (b, a)
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def game_metrics(trainer: PPOTrainer, rollout) -> dict:
    """Per-iteration game metrics (``on_step``): return, turns, first-try accuracy, the level played."""
    returns = rollout.raw_scores + rollout.step_scores.sum(-1)
    first = (returns == 1.0).float().mean().item()  # 1 only for a right first try (a second try earns 0.5)
    return episode_stats(rollout) | {"env/first_try": first, "env/level": trainer.envs[0].level}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/env-game")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", type=int, default=1200, help="prompt draws for preference pairs (two answers each)")
    args = parser.parse_args()
    out, start = Path(args.out), time.time()
    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    seed_everything(args.seed)
    config = base_config(args.seed)
    # 1. SFT: the player who knows the level-1 rule
    eos = char_tokenizer("0").eos_token
    write_jsonl(out / "data/sft.jsonl", sft_records(4000, args.seed, eos))
    config.sft.data = str(out / "data/sft.jsonl")
    sft_dir = out / "sft/model"
    if not (sft_dir / "config.json").is_file():
        sft_dir = train_sft(config, out / "sft", echo=lambda *_: None)
    tokenizer, sft = load_tokenizer(str(sft_dir)), load_causal_lm(str(sft_dir)).eval()
    # 2-3. DPO on pairs from before the change (and, as a control, from after it)
    dpo_dirs = {}
    for level in (1, 2):
        pairs = preference_pairs(sft, tokenizer, level, args.pairs, args.seed + level)
        write_jsonl(out / f"data/pairs_level{level}.jsonl", pairs)
        config.model.policy, config.dpo.data = str(sft_dir), str(out / f"data/pairs_level{level}.jsonl")
        dpo_dirs[level] = train_dpo(config, out / f"dpo_level{level}", echo=lambda *_: None)
        print(f"DPO on {len(pairs)} pairs collected at level {level}: {dpo_dirs[level]}")
    # 4. PPO on the game across the rule change
    config.model.policy = str(sft_dir)
    trainer = PPOTrainer.from_config(config)
    before = {}

    def on_step(trainer: PPOTrainer, rollout) -> dict:
        if trainer.iteration == CHANGE:  # the last iteration at level 1: keep that player
            before["policy"] = copy.deepcopy(trainer.actor_critic.policy).eval()
        return game_metrics(trainer, rollout)

    trainer.train(all_prompts(), out / "ppo", echo=lambda *_: None, on_step=on_step)
    events = json.loads((out / "ppo/summary.json").read_text()).get("events", [])
    for event in events:  # e.g. the KL guard stopping the run: reported, and the table says what PPO played
        print(f"PPO {event['kind']} at iteration {event['iteration']}: {event.get('evidence', '')}")
    # 5. every player at both levels (PPO before the change only if the run got there)
    players = {
        "sft": sft,
        "dpo_before": load_causal_lm(str(dpo_dirs[1])).eval(),
        "dpo_after": load_causal_lm(str(dpo_dirs[2])).eval(),
        **({"ppo_before": before["policy"]} if "policy" in before else {}),
        "ppo_after": trainer.actor_critic.policy.eval(),
    }
    results = {
        k: {f"level{lv}": play(p, tokenizer, lv, seed=args.seed + 9) for lv in (1, 2)} for k, p in players.items()
    }
    summary = {"seed": args.seed, "change_at": CHANGE, "players": results, "ppo_events": events}
    summary["wall_seconds"] = time.time() - start
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(table(results))
    print(f"wall time {summary['wall_seconds']:.0f} s")
    plot(read_metrics(out / "ppo/metrics.jsonl"), results, out / "env_game.png", args.seed)


NAMES = {
    "sft": "SFT (knows rule A)",
    "dpo_before": "DPO on pairs from level 1 (before the change)",
    "dpo_after": "DPO on pairs re-collected at level 2 (control)",
    "ppo_before": f"PPO at iteration {CHANGE} (before the change)",
    "ppo_after": "PPO at its last iteration (or what the KL guard restored, if it stopped the run)",
}
LINES = [  # (player, colour, style, label, levels drawn): evaluations drawn over the iterations of their level
    ("sft", "0.5", "--", "SFT (rule A)", (1, 2)),
    ("dpo_before", "C3", "--", "DPO, pairs from before the change", (1, 2)),
    ("dpo_after", "C2", ":", "DPO, pairs re-collected after the change", (2,)),
]


def table(results: dict) -> str:
    lines = [
        "| player | level 1: return | level 1: right first try | level 2: return | level 2: right first try |",
        "|---|---|---|---|---|",
    ]
    for key, r in results.items():
        cells = [f"{r[f'level{lv}']['return']:.3f} | {r[f'level{lv}']['first_try']:.1%}" for lv in (1, 2)]
        lines.append(f"| {NAMES[key]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(records: list[dict], results: dict, path: Path, seed: int) -> None:
    """PPO's rollouts per iteration, and the other players' evaluations as lines over the iterations of each level."""
    steps = [r["step"] for r in records]
    spans = {1: (0.5, CHANGE + 0.5), 2: (CHANGE + 0.5, steps[-1] + 0.5)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key, title in zip(axes, ("return", "first_try"), ("episode return", "right at the first try")):
        ax.plot(steps, [r[f"env/{key}"] for r in records], color="C0", label="PPO, playing (its rollouts)")
        for player, color, style, label, levels in LINES:
            for i, lv in enumerate(levels):
                value = results[player][f"level{lv}"][key]
                ax.hlines(value, *spans[lv], colors=color, linestyles=style, label=None if i else label)
        ax.axvline(CHANGE + 0.5, color="k", lw=0.8)
        ax.text(CHANGE + 1.5, 0.03, "rule changes", fontsize=8)
        ax.set(title=title, xlabel="PPO iteration", ylim=(0, 1.05))
    axes[1].legend(fontsize=8, loc="center right")
    fig.suptitle(f"high-low: say the larger digit until iteration {CHANGE}, then the smaller (seed {seed})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
