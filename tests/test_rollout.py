import torch

from tether.algo import logprobs_from_logits
from tether.data import prompt_batch
from tether.models import ActorCritic, load_causal_lm, load_reward_model, reference_copy
from tether.passes import response_logits
from tether.precision import Placement
from tether.rewards import FunctionScorer, RewardModelScorer
from tether.rollout import Sampling, collect_rollout, generate, mask_after_eos, score_tokens


def test_mask_after_eos_keeps_eos_and_pads_the_rest():
    eos, pad = 1, 0
    ids = torch.tensor([[5, 6, 1, 7, 1], [5, 5, 5, 5, 5], [1, 9, 9, 9, 9]])
    out, mask = mask_after_eos(ids, eos, pad)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert out.tolist() == [[5, 6, 1, 0, 0], [5, 5, 5, 5, 5], [1, 0, 0, 0, 0]]


def test_left_padding_does_not_change_logits(policy_dir, tokenizer, device):
    placement = Placement(torch.device(device))
    policy = placement.frozen(load_causal_lm(policy_dir))
    ids, mask = map(placement.move, prompt_batch(tokenizer, ["1+1=", "12*34+5="], 32))
    answers = tokenizer(["23", "9!"], add_special_tokens=False, return_tensors="pt").input_ids
    seq = torch.cat([ids, placement.move(answers)], 1)
    full_mask = torch.cat([mask, torch.ones_like(mask[:, :2])], 1)
    padded = response_logits(policy, seq, full_mask, ids.shape[1], 1.0, tokenizer.eos_token_id)
    alone = seq[0:1, mask[0].argmax() :]  # the first row without its padding
    unpadded = response_logits(policy, alone, torch.ones_like(alone), alone.shape[1] - 2, 1.0, tokenizer.eos_token_id)
    torch.testing.assert_close(padded[0:1], unpadded, atol=1e-5, rtol=1e-5)


def test_rollout_logprobs_match_the_sampler_and_the_update(policy_dir, reward_dir, tokenizer, device):
    torch.manual_seed(0)
    placement = Placement(torch.device(device))
    policy = load_causal_lm(policy_dir)
    actor_critic = placement.trained(ActorCritic(policy))
    reference = placement.frozen(reference_copy(policy))
    scorer = RewardModelScorer(load_reward_model(reward_dir), tokenizer.eos_token_id, placement=placement)
    ids, mask = map(placement.move, prompt_batch(tokenizer, ["1+1=", "2*3=", "9-4=", "7+7="], 32))
    rollout = collect_rollout(actor_critic, reference, scorer, tokenizer, ids, mask, Sampling(12, 0.7), chunk=3)
    # policy and reference are identical at the start: KL is exactly zero
    torch.testing.assert_close(rollout.logprobs, rollout.ref_logprobs)
    # the value head starts at zero, and padding positions carry nothing
    assert rollout.values.abs().max() == 0
    assert (rollout.logprobs[rollout.response_mask == 0] == 0).all()
    # recomputing with the update's forward gives ratio 1 (temperature-scaled logits in both)
    logits, _ = actor_critic(rollout.sequence_ids, rollout.attention_mask, ids.shape[1], 0.7, tokenizer.eos_token_id)
    new = logprobs_from_logits(logits, rollout.response_ids) * rollout.response_mask
    torch.testing.assert_close(new, rollout.logprobs, atol=1e-5, rtol=0)
    assert rollout.raw_scores.shape == (4,)


def test_scoring_skips_columns_that_are_padding_in_every_row_of_a_chunk(policy_dir, reward_dir, tokenizer, device):
    """Scored one row at a time, each row reaches the models without its padding (a prompt's leading pad, a
    response's trailing pad), and log-probs, values and entropy are those of scoring the padded rows together."""
    torch.manual_seed(0)
    placement = Placement(torch.device(device))
    policy = load_causal_lm(policy_dir)
    actor_critic = placement.trained(ActorCritic(policy, load_reward_model(reward_dir))).eval()
    reference = placement.frozen(reference_copy(policy))
    prompt_ids, prompt_mask = prompt_batch(tokenizer, ["1+1=", "12*34+5=", "9-4=", "7+77*3="], 32)
    answers = [
        tokenizer(a, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for a in ["2", "413", "5", "23"]
    ]
    width = max(map(len, answers))
    response_ids = torch.tensor([a + [tokenizer.pad_token_id] * (width - len(a)) for a in answers])
    response_mask = (torch.arange(width) < torch.tensor([len(a) for a in answers])[:, None]).long()
    ids, mask = torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, response_mask], 1)
    args = [placement.move(t) for t in (ids, mask)] + [prompt_ids.shape[1], placement.move(response_ids), 0.7]
    seen = []
    reference.get_input_embeddings().register_forward_hook(lambda module, a, out: seen.append(a[0].shape[1]))
    together = score_tokens(actor_critic, reference, *args, tokenizer.eos_token_id, chunk=4)
    alone = score_tokens(actor_critic, reference, *args, tokenizer.eos_token_id, chunk=1)
    assert seen == [ids.shape[1], *sorted(mask.sum(1).tolist())]  # one at a time, from the shortest row
    real = placement.move(response_mask) == 1
    for key, value in together.items():
        assert alone[key].shape == value.shape
        torch.testing.assert_close(alone[key][real], value[real], atol=1e-5, rtol=1e-5, msg=key)


def test_generate_stops_at_eos_and_respects_max_new_tokens(policy_dir, tokenizer, device):
    torch.manual_seed(0)
    placement = Placement(torch.device(device))
    policy = placement.frozen(load_causal_lm(policy_dir))
    ids, mask = map(placement.move, prompt_batch(tokenizer, ["1+1="] * 16, 32))
    resp, resp_mask = generate(policy, ids, mask, Sampling(6, 1.0), tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert resp.shape[1] <= 6
    for row, m in zip(resp, resp_mask):
        n = int(m.sum())
        eos_positions = (row[:n] == tokenizer.eos_token_id).nonzero()
        assert len(eos_positions) <= 1 and (len(eos_positions) == 0 or eos_positions[0, 0] == n - 1)
        assert (row[n:] == tokenizer.pad_token_id).all()


def test_function_scorer_sees_decoded_text(tokenizer):
    seen = {}

    def reward_fn(prompts, responses):
        seen["pairs"] = list(zip(prompts, responses))
        return [float(len(r)) for r in responses]

    ids, mask = prompt_batch(tokenizer, ["1+1=", "10*10="], 32)
    resp = tokenizer(["2", "100"], add_special_tokens=False, padding=True, return_tensors="pt")
    resp_ids = torch.cat([resp.input_ids, torch.full((2, 1), tokenizer.eos_token_id)], 1)
    resp_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])  # "2<eos>" is right-padded; "100<eos>" is full
    resp_ids[0] = torch.tensor([tokenizer.convert_tokens_to_ids("2"), tokenizer.eos_token_id, 0, 0])
    scores = FunctionScorer(reward_fn)(ids, mask, resp_ids, resp_mask, tokenizer=tokenizer)
    assert seen["pairs"] == [("1+1=", "2"), ("10*10=", "100")]
    assert scores.tolist() == [1.0, 3.0]


def test_reward_model_with_its_own_tokenizer_scores_the_text(tokenizer, policy_dir, tmp_path):
    from transformers import GPT2ForSequenceClassification

    from tether.data import preference_batch
    from tether.models import char_tokenizer, tiny_config
    from tether.passes import sequence_scores

    rm_tok = char_tokenizer("=+-*0123456789 abcdefghijklmnopqrstuvwxyz?!.,'ABCDEFGHIJKLMNOPQRSTUVWXYZ|")
    assert rm_tok.get_vocab() != tokenizer.get_vocab()
    config = tiny_config(len(rm_tok), rm_tok.pad_token_id, rm_tok.eos_token_id, n_embd=32, n_layer=1, num_labels=1)
    rm = GPT2ForSequenceClassification(config).eval()
    scorer = RewardModelScorer(rm, tokenizer.eos_token_id, rm_tok)
    ids, mask = prompt_batch(tokenizer, ["1+1=", "12*3="], 32)
    eos = tokenizer.eos_token_id
    resp = torch.tensor(
        [
            [tokenizer.convert_tokens_to_ids("2"), eos, 0],
            [tokenizer.convert_tokens_to_ids("3"), tokenizer.convert_tokens_to_ids("6"), eos],
        ]
    )
    resp_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    got = scorer(ids, mask, resp, resp_mask, tokenizer=tokenizer)
    batch = preference_batch(
        rm_tok,
        [{"prompt": "1+1=", "chosen": "2", "rejected": "x"}, {"prompt": "12*3=", "chosen": "36", "rejected": "x"}],
        32,
    )
    want = sequence_scores(rm, batch.input_ids, batch.attention_mask, rm_tok.eos_token_id)[:2]
    torch.testing.assert_close(got, want)
