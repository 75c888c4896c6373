"""Chat models: conversational data in TRL's conventions, chat templates, several stop tokens, `tether sample`."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from tether.cli import run
from tether.data import (
    encode_prompt,
    preference_pairs,
    read_jsonl,
    render_prompt,
    sft_batch,
    sft_examples,
)
from tether.errors import TetherError
from tether.models import load_causal_lm
from tether.rollout import Sampling, build_rollout, generate, mask_after_eos, stop_ids

# A template made of characters the tests' character tokenizer knows; <eos> closes every turn.
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}"
)
CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1="}]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory, policy_dir):
    """The tiny policy with a chat template, as a chat model's folder has one."""
    path = tmp_path_factory.mktemp("chat")
    load_causal_lm(policy_dir).save_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(path)
    return path


def with_template(tokenizer):
    tokenizer = copy.deepcopy(tokenizer)  # the session's tokenizer stays without a template
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def test_conversation_is_rendered_with_the_template_and_generation_prompt(tokenizer):
    tokenizer = with_template(tokenizer)
    assert render_prompt(tokenizer, CONVERSATION) == "system be brief<eos>user 1+1=<eos>assistant "
    ids = encode_prompt(tokenizer, CONVERSATION, 64)
    assert tokenizer.decode(ids) == "system be brief<eos>user 1+1=<eos>assistant "
    assert ids.count(tokenizer.eos_token_id) == 2  # the template's special tokens are tokens, not characters
    assert encode_prompt(tokenizer, "1+1=", 64) == tokenizer("1+1=")["input_ids"]  # strings stay raw text


def test_conversation_without_a_template_is_one_line_error(tokenizer):
    with pytest.raises(TetherError, match="has no chat template; give prompts as strings") as info:
        encode_prompt(tokenizer, CONVERSATION, 64)
    assert "\n" not in str(info.value)


def test_data_files_accept_conversations_and_name_bad_ones(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": CONVERSATION}) + "\n" + json.dumps({"prompt": [{"role": "user"}]}) + "\n")
    with pytest.raises(TetherError, match=r"p.jsonl:2: field 'prompt' must be a string or a list of"):
        read_jsonl(path, ("prompt",))
    path.write_text(json.dumps({"prompt": CONVERSATION}) + "\n")
    assert read_jsonl(path, ("prompt",))[0]["prompt"] == CONVERSATION


def test_sft_messages_and_preference_messages(tokenizer):
    tokenizer = with_template(tokenizer)
    answer = {"role": "assistant", "content": "2"}
    examples = sft_examples([{"messages": CONVERSATION + [answer]}, {"prompt": "3+3=", "response": "6"}], "d.jsonl")
    assert examples == [{"prompt": CONVERSATION, "response": "2"}, {"prompt": "3+3=", "response": "6"}]
    ids, _, loss_mask = sft_batch(tokenizer, examples[:1], 64)
    learned = ids[0][loss_mask[0].bool()].tolist()
    assert tokenizer.decode(learned[:-1]) == "2" and learned[-1] == tokenizer.eos_token_id  # only the answer
    with pytest.raises(TetherError, match="d.jsonl: record 1: 'messages' must end with an assistant message"):
        sft_examples([{"messages": CONVERSATION}], "d.jsonl")
    pairs = preference_pairs([{"prompt": CONVERSATION, "chosen": [answer], "rejected": "3"}], "p.jsonl")
    assert pairs[0]["chosen"] == "2" and pairs[0]["rejected"] == "3" and pairs[0]["prompt"] == CONVERSATION
    with pytest.raises(TetherError, match="p.jsonl: record 1: a response given as messages must end with an assis"):
        preference_pairs([{"prompt": "x", "chosen": [{"role": "user", "content": "2"}], "rejected": "3"}], "p.jsonl")


def test_every_stop_token_ends_a_response(policy_dir, tokenizer):
    policy = load_causal_lm(policy_dir)
    digits = tokenizer.convert_tokens_to_ids(list("0123456789"))
    policy.generation_config.eos_token_id = [tokenizer.eos_token_id, *digits]
    stops = stop_ids(tokenizer, policy)
    assert stops == [tokenizer.eos_token_id, *digits]
    a, two = tokenizer.convert_tokens_to_ids(["a", "2"])
    ids, mask = mask_after_eos(torch.tensor([[a, two, a, 1], [a, a, a, a]]), stops, 0)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]] and ids.tolist()[0] == [a, two, 0, 0]
    torch.manual_seed(0)
    prompt = torch.tensor([tokenizer("1+1=")["input_ids"]] * 64)
    resp, resp_mask = generate(policy, prompt, torch.ones_like(prompt), Sampling(8), stops, tokenizer.pad_token_id)
    lengths = resp_mask.sum(-1)
    ended_with_digit = 0
    for row, n in zip(resp.tolist(), lengths.tolist()):
        assert not any(t in stops for t in row[: n - 1])  # nothing after the first stop token counts
        ended_with_digit += row[n - 1] in digits
    assert ended_with_digit > 0  # the extra stop ids really stop generation
    rollout_ended = build_rollout(
        policy_actor(policy),
        policy,
        prompt,
        torch.ones_like(prompt),
        resp,
        resp_mask,
        torch.zeros(64),
        1.0,
        tokenizer.eos_token_id,
        64,
        stops=stops,
    ).ended
    assert rollout_ended.tolist() == [row[n - 1] in stops for row, n in zip(resp.tolist(), lengths.tolist())]


def policy_actor(policy):
    from tether.models import ActorCritic

    return ActorCritic(policy)


def test_ppo_on_conversations_gives_the_reward_function_the_messages(tmp_path, chat_dir):
    (tmp_path / "seen.py").write_text(
        "import json\n"
        "def reward(prompts, responses):\n"
        "    with open('seen.jsonl', 'a') as f:\n"
        "        f.write(json.dumps(prompts) + '\\n')\n"
        "    return [float(len(r)) for r in responses]\n"
    )
    prompts = [[{"role": "user", "content": f"{i}+1="}] for i in range(8)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    args = [f"model.policy={chat_dir}", "model.reward_model=seen:reward", "ppo.prompts=prompts.jsonl"]
    args += ["ppo.steps=1", "ppo.rollout_batch_size=8", "ppo.mini_batch_size=8", "sampling.max_new_tokens=6"]
    result = subprocess.run(
        [sys.executable, "-m", "tether.cli", "ppo", *args, "output_dir=run"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads((tmp_path / "seen.jsonl").read_text().splitlines()[0])
    assert sorted(seen, key=str) == sorted(prompts, key=str)  # as the data gave them, not decoded text


def test_sample_renders_the_chat_template_and_labels_prompt_and_answer(chat_dir, monkeypatch, capsys):
    import tether.rollout

    real, seen = tether.rollout.generate, []

    def spy(policy, ids, mask, *args, **kwargs):
        seen.append(tokenizer.decode(ids[0][mask[0].bool()]))
        return real(policy, ids, mask, *args, **kwargs)

    tokenizer = AutoTokenizer.from_pretrained(chat_dir)
    monkeypatch.setattr(tether.rollout, "generate", spy)
    for extra in ([], ["--no-chat-template"]):
        assert run(["sample", str(chat_dir), "1+1=", "2+2=", "--max-new-tokens", "4", *extra]) == 0
        out = capsys.readouterr().out
        assert out.startswith("prompt: 1+1=\nanswer: ") and "\n\nprompt: 2+2=\nanswer: " in out
    assert seen == ["user 1+1=<eos>assistant ", "1+1="]  # the template, then raw text


def test_pad_equals_eos_models_save_a_pad_id_inside_their_vocabulary(tmp_path, policy_dir, tiny_ppo_args):
    """A pad = EOS tokenizer gets tether's own pad token beyond the embeddings; saved configs must not name it
    (Llama-family models refuse to load a pad id outside their vocabulary)."""
    from tether.models import load_reward_model

    init = tmp_path / "init"
    load_causal_lm(policy_dir).save_pretrained(init)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    vocab = len(tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(init)
    pairs = [{"prompt": f"{a}+1=", "chosen": str(a + 1), "rejected": "x"} for a in range(20)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    code = run(
        [
            "reward",
            f"model.policy={init}",
            f"reward.data={tmp_path / 'pairs.jsonl'}",
            "reward.epochs=1",
            "reward.batch_size=8",
            "logging.print_every=0",
            f"output_dir={tmp_path / 'rm'}",
        ]
    )
    assert code == 0
    model = load_reward_model(str(tmp_path / "rm" / "model"))
    assert model.config.pad_token_id == tokenizer.eos_token_id < vocab
