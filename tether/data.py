"""Data: JSONL records (checked line by line) and their tokenization into padded batches.

Formats (one JSON object per line):
- SFT:        {"prompt": "2+3=", "response": "5"}
- preference: {"prompt": "2+3=", "chosen": "5", "rejected": "Sure! 6"}
- prompts:    {"prompt": "2+3="}

A sequence is ``tokenizer(prompt) + tokenizer(response, no special tokens) + EOS``; prompts are left-padded so that
every response starts at the same column.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tether.errors import TetherError
from tether.types import PreferenceBatch


def read_jsonl(path: str | Path, required: tuple[str, ...]) -> list[dict]:
    """Read a JSONL file whose records each have the string fields ``required``; errors name file and line."""
    path = Path(path)
    if not str(path) or not path.is_file():
        raise TetherError(f"{path}: data file not found")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TetherError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise TetherError(f"{path}:{lineno}: expected a JSON object with fields {', '.join(required)}")
            for name in required:
                if name not in record:
                    raise TetherError(f"{path}:{lineno}: missing field '{name}'")
                if not isinstance(record[name], str):
                    raise TetherError(f"{path}:{lineno}: field '{name}' must be a string")
            records.append(record)
    if not records:
        raise TetherError(f"{path}: no records")
    return records


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    """Write records one JSON object per line (atomically: a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)


def encode_prompt(tokenizer, prompt: str, max_length: int) -> list[int]:
    """Prompt token ids (with the tokenizer's own special tokens), cut from the left to ``max_length``."""
    ids = tokenizer(prompt)["input_ids"]
    return ids[-max_length:]


def encode_response(tokenizer, response: str) -> list[int]:
    """Response token ids followed by EOS."""
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token lists into (ids, mask), padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
    return ids, mask


def prompt_batch(tokenizer, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask (B, P)."""
    return left_pad([encode_prompt(tokenizer, p, max_length) for p in prompts], tokenizer.pad_token_id)


def sequence_rows(tokenizer, prompt: str, response: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of prompt + response + EOS (cut to ``max_length`` from the left) and the prompt's token count."""
    prompt_ids = encode_prompt(tokenizer, prompt, max_length)
    response_ids = encode_response(tokenizer, response)
    ids = (prompt_ids + response_ids)[-max_length:]
    return ids, max(len(ids) - len(response_ids), 0)


def sft_batch(tokenizer, records: list[dict], max_length: int):
    """(ids, attention_mask, loss_mask): loss_mask is 1 on response tokens (and EOS), the ones SFT learns."""
    rows, masks = [], []
    for r in records:
        ids, n_prompt = sequence_rows(tokenizer, r["prompt"], r["response"], max_length)
        rows.append(ids)
        masks.append([0] * n_prompt + [1] * (len(ids) - n_prompt))
    ids, attention_mask = left_pad(rows, tokenizer.pad_token_id)
    loss_mask, _ = left_pad(masks, 0)
    return ids, attention_mask, loss_mask


def preference_batch(tokenizer, records: list[dict], max_length: int) -> PreferenceBatch:
    """Chosen rows then rejected rows, one left-padded batch.

    >>> batch = preference_batch(tok, [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}], 16)  # doctest: +SKIP
    >>> batch.input_ids.shape  # (2 * pairs, longest sequence): row 0 is '1+1=2<eos>', row 1 is '1+1=3<eos>'
    """
    rows = [sequence_rows(tokenizer, r["prompt"], r["chosen"], max_length)[0] for r in records]
    rows += [sequence_rows(tokenizer, r["prompt"], r["rejected"], max_length)[0] for r in records]
    ids, mask = left_pad(rows, tokenizer.pad_token_id)
    return PreferenceBatch(input_ids=ids, attention_mask=mask)
