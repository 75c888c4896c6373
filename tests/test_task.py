import random

from tether.demo import task


def test_solve_and_gold_judge():
    assert task.solve("7*8=") == 56 and task.solve("3-9=") == -6
    assert task.gold_score("7*8=", "56") == 1.0
    # "Great question! It is 56." has 25 characters, 23 beyond "56": 1 - 0.23
    assert abs(task.gold_score("7*8=", "Great question! It is 56.") - 0.77) < 1e-9
    assert task.gold_score("7*8=", "54") == 0.0
    # two numbers, even if one is right, is not a correct answer
    assert not task.is_correct("7*8=", "54 or 56")
    assert task.is_correct("3-9=", "It is -6.")
    # filler is capped at 30 characters
    assert task.gold_score("1+1=", "x" * 100 + " 3") == -0.3


def test_prompt_split_is_disjoint_and_complete():
    train, held_out = task.split_prompts(60, seed=0)
    assert len(held_out) == 60 and len(train) == 240
    assert not set(train) & set(held_out)
    assert set(train) | set(held_out) == set(task.all_prompts())


def test_sft_habits_have_the_advertised_rates():
    records = task.sft_records(4000, seed=1)
    correct = sum(task.is_correct(r["prompt"], r["response"]) for r in records) / len(records)
    # 0.45 * 0.15 + 0.55 * 0.97 = 0.601
    assert 0.56 < correct < 0.64


def test_labeller_follows_gold_with_bradley_terry_noise():
    rng = random.Random(0)
    picks = [task.label_pair("2+2=", "4", "5", 0.1, rng)["chosen"] for _ in range(400)]
    assert picks.count("4") / len(picks) > 0.99  # gold gap 1.0 -> sigmoid(10)
    picks = [task.label_pair("2+2=", "4", "4.", 0.1, rng)["chosen"] for _ in range(2000)]
    # gold gap 0.01 -> P(prefer "4") = sigmoid(0.1) = 0.525
    assert 0.48 < picks.count("4") / len(picks) < 0.57


def test_biased_labellers_prefer_length_or_filler_by_the_documented_strength():
    rng = random.Random(0)
    # length: "I am not sure." (14 chars, gold -0.12) vs "4" (gold 1): 1.4 * 3 - 0.12 = 4.08 > 1 -> the evasion wins
    assert task.bias_feature("length", " I am not sure. ") == 1.4
    assert task.label_pair("2+2=", "4", "I am not sure.", 0.05, rng, "length", 3.0)["chosen"] == "I am not sure."
    # strength 0.5: 0.7 - 0.12 = 0.58 < 1 -> the right answer still wins
    assert task.label_pair("2+2=", "4", "I am not sure.", 0.05, rng, "length", 0.5)["chosen"] == "4"
    # politeness: one phrase is worth `strength` gold points, a wrong polite answer beats a right plain one at 3
    assert task.bias_feature("politeness", "Great question! Sure! 4") == 2
    assert task.label_pair("2+2=", "4", "Sure! 5", 0.05, rng, "politeness", 3.0)["chosen"] == "Sure! 5"
    assert task.label_pair("2+2=", "4", "Sure! 5", 0.05, rng, "politeness", 0.0)["chosen"] == "4"
    assert task.bias_feature("none", "Sure! anything long") == 0.0


def test_balanced_pairs_leave_the_bias_nothing_to_prefer():
    assert task.balanced("length", "It is 4.", "It is 5.") and task.balanced("length", "4", "It")
    assert not task.balanced("length", "4", "It is 4.")  # 7 characters apart
    assert task.balanced("politeness", "Sure! 4", "Great question! 5") and task.balanced("politeness", "4", "5")
    assert not task.balanced("politeness", "Sure! 4", "4")
