"""Bad input a new user meets, through the command line in subprocesses: a one-line error and exit status 2."""

import json
import subprocess
import sys

import pytest

from tether.cli import run

BAD_REWARDS = """
def boom(prompts, responses):
    raise ValueError("bad")


def words(prompts, responses):
    return ["good" for _ in responses]
"""


def tether(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "tether.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def assert_one_line(result, message):
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"tether: {message}"
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "function, message",
    [
        ("boom", "reward function 'bad_rewards:boom' raised ValueError: bad"),
        ("words", "reward function 'bad_rewards:words' must return numbers, one per response; got ['good', 'good']"),
    ],
)
def test_a_broken_reward_function_is_named(tmp_path, policy_dir, function, message):
    (tmp_path / "bad_rewards.py").write_text(BAD_REWARDS)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+1="}) + "\n" for i in range(2)))
    result = tether(
        "ppo",
        f"model.policy={policy_dir}",
        f"model.reward_model=bad_rewards:{function}",
        "ppo.prompts=prompts.jsonl",
        "ppo.steps=1",
        "ppo.rollout_batch_size=2",
        "ppo.mini_batch_size=2",
        "sampling.max_new_tokens=4",
        f"output_dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert_one_line(result, message)


@pytest.mark.parametrize(
    "args, message",
    [
        (["sft", "sft.lr=-0.001"], "sft.lr must be a learning rate >= 0, got -0.001"),
        (["reward", "reward.lr=-1"], "reward.lr must be a learning rate >= 0, got -1.0"),
        (["ppo", "ppo.lr=-1e-5"], "ppo.lr must be a learning rate >= 0, got -1e-05"),
        (["sft", "sft.data=sft.jsonl", "output_dir=taken"], "output_dir 'taken' is an existing file, not a folder"),
        (
            ["ppo", "ppo.prompts=p.jsonl", "model.reward_model=m:f"],
            "model.policy=tiny is a new, untrained model for `tether sft`; PPO needs a trained policy folder "
            "(e.g. model.policy=runs/sft-.../model)",
        ),
        (
            ["reward", "reward.data=pairs.jsonl"],
            "model.policy=tiny is a new, untrained model for `tether sft`; a reward model starts from a trained "
            "folder (set reward.init or model.policy, e.g. to runs/sft-.../model)",
        ),
    ],
)
def test_bad_settings_are_one_line(tmp_path, args, message):
    (tmp_path / "taken").write_text("a file, not a folder\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "1+1="}\n')
    (tmp_path / "sft.jsonl").write_text('{"prompt": "1+1=", "response": "2"}\n')
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n')
    overrides = [] if any(a.startswith("output_dir=") for a in args) else [f"output_dir={tmp_path / 'run'}"]
    assert_one_line(tether(*args, *overrides, cwd=tmp_path), message)
    assert (tmp_path / "taken").read_text() == "a file, not a folder\n"


def test_no_length_balanced_pair_is_one_line(tmp_path, policy_dir):
    pairs = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": "Hmm, hard to say."} for i in range(8)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    result = tether(
        "reward",
        f"model.policy={policy_dir}",
        f"reward.data={tmp_path / 'pairs.jsonl'}",
        "reward.max_length_gap=5",
        "reward.eval_fraction=0.25",
        f"output_dir={tmp_path / 'run'}",
    )
    message = (
        "reward.max_length_gap=5: none of the 6 training pairs has |len(chosen) - len(rejected)| < 5 tokens; "
        "raise it or set it to none"
    )
    assert_one_line(result, message)


def test_help_says_tiny_is_for_sft(capsys):
    assert run(["ppo", "--help"]) == 0
    assert "'tiny' (a new, untrained GPT-2) is only for tether sft" in capsys.readouterr().out


def test_sample_names_a_bad_device(policy_dir):
    assert_one_line(
        tether("sample", policy_dir, "1+1=", "--device", "tpu"), "--device 'tpu': expected auto, cpu, cuda or cuda:N"
    )


def test_compile_with_gradient_checkpointing_is_one_line(tmp_path, policy_dir):
    (tmp_path / "bad_rewards.py").write_text(BAD_REWARDS)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "1+1="}\n')
    result = tether(
        "ppo",
        f"model.policy={policy_dir}",
        "model.reward_model=bad_rewards:boom",
        "ppo.prompts=prompts.jsonl",
        "model.compile=true",
        "model.gradient_checkpointing=true",
        f"output_dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert_one_line(result, "model.compile and model.gradient_checkpointing: set one of them, not both")


def test_a_policy_whose_logits_tether_cannot_read_is_one_line(tmp_path, policy_dir):
    """A BERT turned decoder puts a transform between its last hidden state and its output embedding: sampling
    and PPO would train a model it is not, so loading it as a policy is refused, naming the folder and the class."""
    from transformers import AutoTokenizer, BertConfig, BertLMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, is_decoder=True)  # fmt: skip
    folder = tmp_path / "bert"
    BertLMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert_one_line(
        tether("sample", folder, "1+1="),
        f"policy '{folder}': BertLMHeadModel is not supported for sampling and PPO: its logits are not its output "
        "embedding applied to its last hidden state",
    )


def test_a_reward_model_without_a_score_head_is_one_line(tmp_path, policy_dir):
    """A BERT classifier pools its first token through a 'classifier', where tether reads a decoder's 'score' head
    at the last token: named in one line when PPO loads it, not an AttributeError at the first scoring."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=1
    )
    BertForSequenceClassification(config).save_pretrained(tmp_path / "bert-rm")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "1+1="}\n')
    result = tether(
        "ppo",
        f"model.policy={policy_dir}",
        f"model.reward_model={tmp_path / 'bert-rm'}",
        "ppo.prompts=prompts.jsonl",
        f"output_dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert_one_line(
        result,
        f"reward model '{tmp_path / 'bert-rm'}': BertForSequenceClassification has no linear 'score' head read at the "
        "last token (tether reads decoder reward models and critics: Llama, Qwen, Mistral, Gemma, GPT-2, ...)",
    )
