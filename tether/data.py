"""Data: JSONL records (checked line by line) and their tokenization into padded batches.

:func:`read_records` also reads the same records from a Hugging Face ``datasets`` folder (``save_to_disk``) or a
``.parquet`` file (the optional ``data`` extra).

Formats (one JSON object per line), in TRL's conventions:
- SFT:        {"prompt": "2+3=", "response": "5"}, or {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}
- preference: {"prompt": "2+3=", "chosen": "5", "rejected": "Sure! 6"}
- prompts:    {"prompt": "2+3="}
Every prompt may instead be a conversation, a list of ``{"role", "content"}`` messages, which is rendered with the
tokenizer's chat template and its generation prompt; responses (``response``, ``chosen``, ``rejected``) may be
strings or assistant messages.

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
    """Read a JSONL file whose records each have the text fields ``required`` (a string or a list of messages);
    errors name the file and line."""
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
                check_text(record[name], f"{path}:{lineno}: field '{name}'")
            records.append(record)
    if not records:
        raise TetherError(f"{path}: no records")
    return records


def read_records(path: str | Path, required: tuple[str, ...]) -> list[dict]:
    """Read records with the text fields ``required`` from JSONL, a ``datasets`` folder or a ``.parquet`` file.

    The source is chosen from the path: a folder written by ``datasets.Dataset.save_to_disk`` (it holds
    ``dataset_info.json`` / ``state.json``, or ``dataset_dict.json`` for a one-split ``DatasetDict``) is read with
    ``datasets.load_from_disk``; a ``*.parquet`` file with pyarrow; anything else as JSONL (:func:`read_jsonl`).
    Errors are one-line :class:`TetherError` s naming the file, and the row (1-based) for a bad field.

    Args:
        path: the JSONL file, parquet file or dataset folder.
        required: field names every record must have as text, a string or a list of messages (``("prompt",)``).

    Returns:
        The records as dicts (every column is kept, not only ``required``).
    """
    path = Path(path)
    if str(path) and path.is_dir():
        rows = _dataset_rows(path)
    elif path.suffix == ".parquet":
        rows = _parquet_rows(path)
    else:
        return read_jsonl(path, required)
    for row_number, record in enumerate(rows, 1):
        for name in required:
            if record.get(name) is None:
                columns = f" (columns: {', '.join(record)})" if name not in record else ""
                raise TetherError(f"{path}: row {row_number}: missing field '{name}'{columns}")
            check_text(record[name], f"{path}: row {row_number}: field '{name}'")
    if not rows:
        raise TetherError(f"{path}: no records")
    return rows


def _dataset_rows(path: Path) -> list[dict]:
    """The rows of a ``save_to_disk`` folder (a Dataset, or a DatasetDict with exactly one split)."""
    if not any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise TetherError(
            f"{path}: a folder, but not a Hugging Face datasets folder (no dataset_info.json or "
            "state.json; write one with Dataset.save_to_disk)"
        )
    try:
        import datasets
    except ImportError:
        raise TetherError(
            f"{path}: reading a datasets folder needs the datasets package (pip install 'tether[data]')"
        ) from None
    try:
        data = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises several types for broken folders
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TetherError(f"{path}: cannot load the dataset ({reason})") from None
    if isinstance(data, datasets.DatasetDict):
        if len(data) != 1:
            raise TetherError(
                f"{path}: a DatasetDict with splits {', '.join(data)}; give one split's folder, "
                f"e.g. {path / next(iter(data))}"
            )
        data = next(iter(data.values()))
    return data.to_list()


def _parquet_rows(path: Path) -> list[dict]:
    """The rows of a parquet file, read with pyarrow."""
    if not path.is_file():
        raise TetherError(f"{path}: data file not found")
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TetherError(f"{path}: reading parquet needs the pyarrow package (pip install 'tether[data]')") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow.ArrowInvalid and friends
        raise TetherError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    """Write records one JSON object per line (atomically: a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)


def check_text(value, where: str) -> None:
    """A text field is a string or a non-empty list of ``{"role": str, "content": str}`` messages."""
    if isinstance(value, str) or is_conversation(value):
        return
    raise TetherError(f'{where} must be a string or a list of {{"role", "content"}} messages')


def is_conversation(value) -> bool:
    """True for a non-empty list of ``{"role": str, "content": str}`` messages."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        )
    )


def render_prompt(tokenizer, prompt) -> str:
    """A prompt as the model reads it: a string as it is; a conversation through the tokenizer's chat template,
    ending with the generation prompt (the assistant's turn opening)."""
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "this tokenizer"
        raise TetherError(f"a prompt is a list of messages, but {name} has no chat template; give prompts as strings")
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def response_text(response) -> str:
    """A response as text: a string, or the content of an assistant message (the last one of a list)."""
    if isinstance(response, str):
        return response
    if response[-1]["role"] != "assistant":
        raise TetherError(
            f"a response given as messages must end with an assistant message, not '{response[-1]['role']}'"
        )
    return response[-1]["content"]


def prompt_label(prompt) -> str:
    """A short text for a prompt in logs and samples: the string, or the last message's content."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def encode_prompt(tokenizer, prompt, max_length: int) -> list[int]:
    """Prompt token ids, cut from the left to ``max_length``: a string with the tokenizer's own special tokens, a
    conversation rendered by :func:`render_prompt` (the template writes its own special tokens)."""
    if isinstance(prompt, str):
        ids = tokenizer(prompt)["input_ids"]
    else:
        ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    return ids[-max_length:]


def encode_response(tokenizer, response) -> list[int]:
    """Response token ids followed by EOS."""
    return tokenizer(response_text(response), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


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


def prompt_batch(tokenizer, prompts: list, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask (B, P)."""
    return left_pad([encode_prompt(tokenizer, p, max_length) for p in prompts], tokenizer.pad_token_id)


def sequence_rows(tokenizer, prompt, response, max_length: int) -> tuple[list[int], int]:
    """Token ids of prompt + response + EOS (cut to ``max_length`` from the left) and the prompt's token count."""
    prompt_ids = encode_prompt(tokenizer, prompt, max_length)
    response_ids = encode_response(tokenizer, response)
    ids = (prompt_ids + response_ids)[-max_length:]
    return ids, max(len(ids) - len(response_ids), 0)


def sft_examples(records: list[dict], path) -> list[dict]:
    """``{"prompt", "response"}`` records from SFT data in either form: prompt/response fields, or ``messages``
    (a conversation whose last message is the assistant's answer, learned; the ones before it are the prompt)."""
    examples = []
    for n, record in enumerate(records, 1):
        where = f"{path}: record {n}"
        if "messages" in record:
            messages = record["messages"]
            check_text(messages, f"{where}: field 'messages'")
            if isinstance(messages, str) or len(messages) < 2 or messages[-1]["role"] != "assistant":
                raise TetherError(f"{where}: 'messages' must end with an assistant message that follows a prompt")
            examples.append({"prompt": messages[:-1], "response": messages[-1]["content"]})
            continue
        for name in ("prompt", "response"):
            if name not in record:
                raise TetherError(f"{where}: missing field '{name}' (or give 'messages')")
            check_text(record[name], f"{where}: field '{name}'")
        examples.append({"prompt": record["prompt"], "response": response_text(record["response"])})
    return examples


def preference_pairs(records: list[dict], path) -> list[dict]:
    """The pairs with ``chosen`` and ``rejected`` as text (assistant messages become their content)."""
    pairs = []
    for n, record in enumerate(records, 1):
        try:
            pairs.append(record | {side: response_text(record[side]) for side in ("chosen", "rejected")})
        except TetherError as e:
            raise TetherError(f"{path}: record {n}: {e}") from None
    return pairs


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
