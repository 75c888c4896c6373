import json

import pytest
import torch

from tether.data import preference_batch, prompt_batch, read_jsonl, sft_batch
from tether.errors import TetherError


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_read_jsonl_reports_file_and_line(tmp_path):
    path = write(tmp_path / "p.jsonl", [json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"}), "{oops"])
    with pytest.raises(TetherError, match=r"p.jsonl:2: not valid JSON"):
        read_jsonl(path, ("prompt", "chosen", "rejected"))


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "1+1=", "chosen": "2"}, "p.jsonl:1: missing field 'rejected'"),
        ({"prompt": 3, "chosen": "2", "rejected": "3"}, "p.jsonl:1: field 'prompt' must be a string"),
        ([1, 2], "p.jsonl:1: expected a JSON object"),
    ],
)
def test_read_jsonl_field_errors(tmp_path, record, message):
    path = write(tmp_path / "p.jsonl", [json.dumps(record)])
    with pytest.raises(TetherError, match=message):
        read_jsonl(path, ("prompt", "chosen", "rejected"))


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(TetherError, match="data file not found"):
        read_jsonl(tmp_path / "nope.jsonl", ("prompt",))
    with pytest.raises(TetherError, match="no records"):
        read_jsonl(write(tmp_path / "e.jsonl", [""]), ("prompt",))


def test_prompts_are_left_padded(tokenizer):
    ids, mask = prompt_batch(tokenizer, ["1+1=", "12*3="], 16)
    assert ids.shape == (2, 5)
    assert mask.tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert ids[0, 0] == tokenizer.pad_token_id
    assert tokenizer.decode(ids[0, 1:]) == "1+1="


def test_sft_batch_learns_only_the_response_and_eos(tokenizer):
    ids, attn, loss_mask = sft_batch(
        tokenizer, [{"prompt": "2+2=", "response": "4"}, {"prompt": "9*9=", "response": "81"}], 32
    )
    # row 0: [pad] 2 + 2 = 4 <eos>; row 1: 9 * 9 = 8 1 <eos>
    assert ids.shape == (2, 7)
    assert loss_mask.tolist() == [[0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1, 1]]
    assert ids[0, -1] == tokenizer.eos_token_id and attn[0, 0] == 0


def test_preference_batch_stacks_chosen_then_rejected(tokenizer):
    batch = preference_batch(tokenizer, [{"prompt": "1+1=", "chosen": "2", "rejected": "Maybe 3?"}], 32)
    assert batch.num_pairs == 1
    chosen = tokenizer.decode(batch.input_ids[0][batch.attention_mask[0].bool()], skip_special_tokens=False)
    rejected = tokenizer.decode(batch.input_ids[1][batch.attention_mask[1].bool()], skip_special_tokens=False)
    assert chosen == "1+1=2<eos>" and rejected == "1+1=Maybe 3?<eos>"
    assert torch.equal(batch.attention_mask.sum(-1), torch.tensor([6, 13]))
