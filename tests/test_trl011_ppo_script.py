"""TRL 0.11.4's ``examples/scripts/ppo.py`` and gpt2-sentiment notebook run on tether with only their imports
changed (issue 16).

``run_ppo_script`` below is that script's flow, statement for statement (its comments left out), and
``run_sentiment_notebook`` the notebook's code cells. What differs, each marked ``# tether:``:
- ``from tether.legacy import ...`` for ``from trl import ...`` and ``from trl.core import ...``;
- offline stand-ins for the two things the script downloads: ``load_dataset`` (an IMDB-shaped local dataset of
  reviews) and the sentiment ``pipeline`` (a rule scoring the share of '7' characters, returning the pipeline's
  ``[{"label", "score"}, ...]`` lists);
- the command line is passed to ``parse_args_into_dataclasses(args=...)`` instead of read from ``sys.argv``, and the
  function returns what the test checks.
Everything else (HfArgumentParser over PPOConfig, ``set_seed``, ``LengthSampler``, ``accelerator.device``,
``.num_processes`` and ``.state.deepspeed_plugin``, ``generate(..., generate_ref_response=True)``, ``step``,
``log_stats``) is the script's own use of the API.
"""

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Optional

import pytest
import torch
from tqdm import tqdm
from transformers import AutoTokenizer, HfArgumentParser, is_torch_npu_available, is_torch_xpu_available

from tether.legacy import (  # tether: was `from trl import ...`
    AutoModelForCausalLMWithValueHead,
    AutoModelForSeq2SeqLMWithValueHead,
    PPOConfig,
    PPOTrainer,
    set_seed,
)
from tether.legacy.core import LengthSampler  # tether: was `from trl.core import LengthSampler`

datasets = pytest.importorskip("datasets")

try:
    from accelerate import Accelerator, PartialState
except ImportError:  # accelerate is the script's own import, not TRL's; tether does not need it

    class PartialState:
        """The one thing the script uses of accelerate's PartialState, for one process."""

        local_process_index = 0

        def local_main_process_first(self):
            import contextlib

            return contextlib.nullcontext()

    Accelerator = PartialState


REVIEWS = [
    "this film was " + "a good one, i liked the acting and the music. " * 5,
    "the plot made no sense at all, " * 8,
    "7 stars out of 10: a fine way to spend an evening with friends and family. " * 3,
    "i would not watch it again, the actors looked bored and so was i. " * 4,
    "an instant classic! the director knows exactly what to show and when. " * 3,
    "too long, too loud and too silly for anyone over 12 years old. " * 4,
    "short review: " + "great! " * 30,
    "the second half drags, but the ending is worth the wait, trust me on this. " * 3,
    "too short",  # filtered out by the script (200 characters or fewer)
]


def load_dataset(name, split):  # tether: a local stand-in for datasets.load_dataset("stanfordnlp/imdb")
    """An IMDB-shaped dataset (``text``, ``label``) of local reviews."""
    return datasets.Dataset.from_dict({"text": REVIEWS, "label": [i % 2 for i in range(len(REVIEWS))]})


class SentimentPipeline:
    """A "sentiment-analysis" pipeline: POSITIVE scores the share of '7' characters (a rule the policy can learn);
    it has the ``tokenizer`` and ``model.config`` the script sets a pad token on."""

    def __init__(self):
        self.tokenizer = SimpleNamespace(pad_token_id=None)
        self.model = SimpleNamespace(config=SimpleNamespace(pad_token_id=None))

    def __call__(self, texts, **kwargs):  # return_all_scores=True / top_k=None: every label's score, as used
        out = []
        for text in texts:
            positive = 10.0 * text.count("7") / max(len(text), 1)
            out.append([{"label": "NEGATIVE", "score": -positive}, {"label": "POSITIVE", "score": positive}])
        return out


def pipeline(task, model=None, device=None):  # tether: a local stand-in for transformers.pipeline
    """The sentiment pipeline the script asks for, without a download."""
    assert task == "sentiment-analysis"
    return SentimentPipeline()


def run_ppo_script(argv: list[str]) -> dict:
    """TRL 0.11.4's examples/scripts/ppo.py with the changes listed in the module docstring."""

    @dataclass
    class ScriptArguments:
        use_seq2seq: bool = field(default=False, metadata={"help": "whether to use seq2seq"})
        trust_remote_code: bool = field(default=False, metadata={"help": "Enable `trust_remote_code`"})
        use_peft: bool = field(default=False, metadata={"help": "whether to use peft"})
        lora_alpha: Optional[float] = field(default=16, metadata={"help": "the lora alpha parameter"})  # noqa: UP045
        lora_r: Optional[int] = field(default=16, metadata={"help": "the lora r parameter"})  # noqa: UP045

    tqdm.pandas()
    parser = HfArgumentParser((ScriptArguments, PPOConfig))
    args, ppo_config = parser.parse_args_into_dataclasses(args=argv)  # tether: args= instead of sys.argv

    sent_kwargs = {"return_all_scores": True, "function_to_apply": "none", "batch_size": 16}

    trl_model_class = AutoModelForCausalLMWithValueHead if not args.use_seq2seq else AutoModelForSeq2SeqLMWithValueHead

    tokenizer = AutoTokenizer.from_pretrained(ppo_config.model_name)
    tokenizer.pad_token = tokenizer.eos_token

    def build_dataset(query_dataset, dataset_num_proc, input_min_text_length=2, input_max_text_length=8):
        ds = load_dataset(query_dataset, split="train")
        ds = ds.rename_columns({"text": "review"})
        ds = ds.filter(lambda x: len(x["review"]) > 200, num_proc=dataset_num_proc)

        input_size = LengthSampler(input_min_text_length, input_max_text_length)

        def tokenize(sample):
            sample["input_ids"] = tokenizer.encode(sample["review"])[: input_size()]
            sample["query"] = tokenizer.decode(sample["input_ids"])
            return sample

        ds = ds.map(tokenize, num_proc=dataset_num_proc)
        ds.set_format(type="torch")
        return ds

    with PartialState().local_main_process_first():
        dataset = build_dataset(ppo_config.query_dataset, ppo_config.dataset_num_proc)

    def collator(data):
        return {key: [d[key] for d in data] for key in data[0]}

    set_seed(ppo_config.seed)

    if not args.use_peft:
        ref_model = trl_model_class.from_pretrained(ppo_config.model_name, trust_remote_code=args.trust_remote_code)
        device_map = None
        peft_config = None
    else:
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, bias="none", task_type="CAUSAL_LM")
        ref_model = None
        device_map = {"": Accelerator().local_process_index}

    model = trl_model_class.from_pretrained(
        ppo_config.model_name,
        trust_remote_code=args.trust_remote_code,
        device_map=device_map,
        peft_config=peft_config,
    )

    tokenizer = AutoTokenizer.from_pretrained(ppo_config.model_name)
    tokenizer.pad_token_id = tokenizer.eos_token_id

    ppo_trainer = PPOTrainer(ppo_config, model, ref_model, tokenizer, dataset=dataset, data_collator=collator)

    device = ppo_trainer.accelerator.device
    if ppo_trainer.accelerator.num_processes == 1:
        if is_torch_xpu_available():
            device = "xpu:0"
        elif is_torch_npu_available():
            device = "npu:0"
        else:
            device = 0 if torch.cuda.is_available() else "cpu"
    ds_plugin = ppo_trainer.accelerator.state.deepspeed_plugin
    task, model_name = ppo_config.reward_model.split(":")
    if ds_plugin is not None and ds_plugin.is_zero3_init_enabled():
        with ds_plugin.zero3_init_context_manager(enable=False):
            sentiment_pipe = pipeline(task, model=model_name, device=device)
    else:
        sentiment_pipe = pipeline(task, model=model_name, device=device)

    if sentiment_pipe.tokenizer.pad_token_id is None:
        sentiment_pipe.tokenizer.pad_token_id = tokenizer.pad_token_id

    if sentiment_pipe.model.config.pad_token_id is None:
        sentiment_pipe.model.config.pad_token_id = tokenizer.pad_token_id

    generation_kwargs = {
        "min_length": -1,
        "top_k": 0.0,
        "top_p": 1.0,
        "do_sample": True,
        "pad_token_id": tokenizer.eos_token_id,
        "max_new_tokens": 32,
    }

    history = []  # tether: what the test checks
    for batch in tqdm(ppo_trainer.dataloader, disable=True):  # tether: no progress bar in the test log
        query_tensors = batch["input_ids"]

        response_tensors, ref_response_tensors = ppo_trainer.generate(
            query_tensors, return_prompt=False, generate_ref_response=True, **generation_kwargs
        )
        batch["response"] = tokenizer.batch_decode(response_tensors)
        batch["ref_response"] = tokenizer.batch_decode(ref_response_tensors)

        texts = [q + r for q, r in zip(batch["query"], batch["response"])]
        pipe_outputs = sentiment_pipe(texts, **sent_kwargs)
        rewards = [torch.tensor(output[1]["score"]) for output in pipe_outputs]
        ref_texts = [q + r for q, r in zip(batch["query"], batch["ref_response"])]
        ref_pipe_outputs = sentiment_pipe(ref_texts, **sent_kwargs)
        ref_rewards = [torch.tensor(output[1]["score"]) for output in ref_pipe_outputs]
        batch["ref_rewards"] = ref_rewards

        stats = ppo_trainer.step(query_tensors, response_tensors, rewards)
        ppo_trainer.log_stats(
            stats, batch, rewards, columns_to_log=["query", "response", "ref_response", "ref_rewards"]
        )
        history.append({"stats": stats, "batch": batch, "ref_response_tensors": ref_response_tensors})
    return {"trainer": ppo_trainer, "history": history, "config": ppo_config, "args": args}


def script_argv(policy_dir: str, *extra: str) -> list[str]:
    """The script's command line for the tiny local policy: 8 reviews, batches of 4, two PPO epochs."""
    return [
        f"--model_name={policy_dir}",
        "--reward_model=sentiment-analysis:local-sevens",
        "--batch_size=4",
        "--mini_batch_size=2",
        "--ppo_epochs=2",
        "--learning_rate=1e-3",
        "--seed=0",
        *extra,
    ]


def test_trl_ppo_script_runs_unchanged(policy_dir):
    before = AutoModelForCausalLMWithValueHead.from_pretrained(policy_dir).pretrained_model.state_dict()
    out = run_ppo_script(script_argv(policy_dir))
    trainer, history, config = out["trainer"], out["history"], out["config"]
    assert isinstance(config, PPOConfig) and config.batch_size == 4 and config.backward_batch_size == 2
    assert len(history) == 2  # 8 reviews over 200 characters, batches of 4, the last partial one dropped
    assert trainer.accelerator.device == trainer.device and trainer.accelerator.num_processes == 1
    for step in history:
        stats, batch = step["stats"], step["batch"]
        assert set(batch) >= {"input_ids", "query", "label", "response", "ref_response", "ref_rewards"}
        assert "review" not in batch  # remove_unused_columns dropped what model.forward does not take
        assert all(2 <= len(q) < 8 for q in batch["input_ids"])  # LengthSampler(2, 8)
        assert len(step["ref_response_tensors"]) == 4
        for key in ("objective/kl", "ppo/mean_scores", "ppo/loss/total", "ppo/policy/policykl", "ppo/val/vpred"):
            assert isinstance(stats[key], float), key
        assert stats["ppo/policy/ratio"].ndim == 1 and len(stats["ppo/policy/ratio"]) > 0
        assert "env/reward_mean" in stats
    after = trainer.model.pretrained_model.state_dict()
    assert any(not torch.equal(before[k], after[k].cpu()) for k in before)  # the policy trained
    ref = trainer.ref_model.pretrained_model.state_dict()
    assert all(torch.equal(before[k], ref[k].cpu()) for k in before)  # the reference did not


def test_trl_ppo_script_with_peft_uses_no_reference_copy(policy_dir):
    pytest.importorskip("peft")
    from tether.lora import AdapterDisabledReference

    out = run_ppo_script(script_argv(policy_dir, "--use_peft", "--lora_r=4"))
    trainer, history = out["trainer"], out["history"]
    assert len(history) == 2
    assert trainer.ref_model is None and trainer.is_peft_model and trainer.config.is_peft_model
    assert isinstance(trainer.core.reference, AdapterDisabledReference)  # the adapter switched off: no copy
    lora = [n for n, p in trainer.model.named_parameters() if p.requires_grad and "lora_" in n]
    assert lora and all(
        "lora_" in n or n.startswith("v_head.") for n, p in trainer.model.named_parameters() if p.requires_grad
    )
    assert isinstance(history[-1]["stats"]["objective/kl"], float)


def run_sentiment_notebook(policy_dir: str) -> dict:
    """TRL 0.11.4's examples/notebooks/gpt2-sentiment.ipynb: its code cells, with the imports changed, wandb left
    out, the local stand-ins above, and batches of 4 (its default 128 is more than the 8 local reviews)."""
    config = PPOConfig(
        model_name=policy_dir,  # tether: a local tiny model for "lvwerra/gpt2-imdb"
        learning_rate=1.41e-5,
        batch_size=4,  # tether: the local dataset is small
        mini_batch_size=4,
    )
    sent_kwargs = {"top_k": None, "function_to_apply": "none", "batch_size": 16}

    def build_dataset(config, dataset_name="stanfordnlp/imdb", input_min_text_length=2, input_max_text_length=8):
        tokenizer = AutoTokenizer.from_pretrained(config.model_name)
        tokenizer.pad_token = tokenizer.eos_token
        ds = load_dataset(dataset_name, split="train")
        ds = ds.rename_columns({"text": "review"})
        ds = ds.filter(lambda x: len(x["review"]) > 200, batched=False)
        input_size = LengthSampler(input_min_text_length, input_max_text_length)

        def tokenize(sample):
            sample["input_ids"] = tokenizer.encode(sample["review"])[: input_size()]
            sample["query"] = tokenizer.decode(sample["input_ids"])
            return sample

        ds = ds.map(tokenize, batched=False)
        ds.set_format(type="torch")
        return ds

    dataset = build_dataset(config)

    def collator(data):
        return dict((key, [d[key] for d in data]) for key in data[0])  # noqa: C404

    model = AutoModelForCausalLMWithValueHead.from_pretrained(config.model_name)
    ref_model = AutoModelForCausalLMWithValueHead.from_pretrained(config.model_name)
    tokenizer = AutoTokenizer.from_pretrained(config.model_name)
    tokenizer.pad_token = tokenizer.eos_token
    ppo_trainer = PPOTrainer(config, model, ref_model, tokenizer, dataset=dataset, data_collator=collator)

    device = ppo_trainer.accelerator.device
    if ppo_trainer.accelerator.num_processes == 1:
        device = 0 if torch.cuda.is_available() else "cpu"
    sentiment_pipe = pipeline("sentiment-analysis", model="lvwerra/distilbert-imdb", device=device)

    gen_kwargs = {
        "min_length": -1,
        "top_k": 0.0,
        "top_p": 1.0,
        "do_sample": True,
        "pad_token_id": tokenizer.eos_token_id,
    }
    output_length_sampler = LengthSampler(4, 16)
    generation_kwargs = dict(gen_kwargs)
    history = []  # tether: what the test checks
    for _epoch, batch in enumerate(tqdm(ppo_trainer.dataloader, disable=True)):
        query_tensors = batch["input_ids"]
        response_tensors = []
        for query in query_tensors:
            gen_len = output_length_sampler()
            generation_kwargs["max_new_tokens"] = gen_len
            query_response = ppo_trainer.generate(query, **generation_kwargs).squeeze()
            response_len = len(query_response) - len(query)
            response_tensors.append(query_response[-response_len:])
        batch["response"] = [tokenizer.decode(r.squeeze()) for r in response_tensors]
        texts = [q + r for q, r in zip(batch["query"], batch["response"])]
        pipe_outputs = sentiment_pipe(texts, **sent_kwargs)
        positive_scores = [item["score"] for output in pipe_outputs for item in output if item["label"] == "POSITIVE"]
        rewards = [torch.tensor(score) for score in positive_scores]
        stats = ppo_trainer.step(query_tensors, response_tensors, rewards)
        ppo_trainer.log_stats(stats, batch, rewards)
        history.append(stats)

    # the notebook's before/after comparison
    bs = 4
    dataset.set_format("pandas")
    df_batch = dataset[:].sample(bs)
    query_tensors = df_batch["input_ids"].tolist()
    response_tensors_ref, response_tensors = [], []
    for i in range(bs):
        query = torch.tensor(query_tensors[i]).to(device)
        gen_len = output_length_sampler()
        query_response = ref_model.generate(query.unsqueeze(0), max_new_tokens=gen_len, **gen_kwargs).squeeze()
        response_tensors_ref.append(query_response[-(len(query_response) - len(query)) :])
        query_response = model.generate(query.unsqueeze(0), max_new_tokens=gen_len, **gen_kwargs).squeeze()
        response_tensors.append(query_response[-(len(query_response) - len(query)) :])
    return {"history": history, "responses": response_tensors, "ref_responses": response_tensors_ref}


def test_trl_sentiment_notebook_runs_unchanged(policy_dir):
    out = run_sentiment_notebook(policy_dir)
    assert len(out["history"]) == 2 and all(isinstance(s["ppo/mean_scores"], float) for s in out["history"])
    assert len(out["responses"]) == len(out["ref_responses"]) == 4
