"""Shared fixtures: tiny random backbones built in code, so model tests run in seconds offline.

Each backbone directory holds a randomly initialised one-output model (safetensors) and the
default backbone's WordPiece tokenizer: the tokenizer is independent of the architecture, and
this keeps every test off the network. The one exception, the SmolLM2-shaped Llama, trains its
own small byte-level BPE tokenizer in code, because its special tokens are what it tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY_KINDS = ("bert", "gpt2", "llama")


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """prefprune's cache folder (converted backbones, the frozen-layer feature store) in a
    session folder: tests never read or write the user's ~/.cache/prefprune."""
    from prefprune.files import CACHE_ENV

    patch = pytest.MonkeyPatch()
    patch.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("prefprune-cache")))
    yield
    patch.undo()


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, two spinning OpenMP threads per process
    make double backward up to 50× slower; no result depends on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_config(kind: str, vocab_size: int, pad_id: int, bos_id: int, eos_id: int):
    from transformers import BertConfig, GPT2Config, LlamaConfig

    if kind == "bert":
        return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=64,
                          max_position_embeddings=128, num_labels=1, pad_token_id=pad_id)
    if kind == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=128,
                          num_labels=1, pad_token_id=pad_id, bos_token_id=bos_id,
                          eos_token_id=eos_id)
    if kind == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                           max_position_embeddings=128, num_labels=1, pad_token_id=pad_id,
                           bos_token_id=bos_id, eos_token_id=eos_id)
    raise ValueError(kind)


def build_tiny_backbone(kind: str, directory: Path, seed: int = 0) -> Path:
    """Save a tiny random ``kind`` sequence-classification model with a tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from prefprune.model import default_backbone

    tokenizer = AutoTokenizer.from_pretrained(default_backbone())
    torch.manual_seed(seed)
    config = _tiny_config(kind, tokenizer.vocab_size, tokenizer.pad_token_id,
                          tokenizer.cls_token_id, tokenizer.sep_token_id)
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


#: SmolLM2-135M-Instruct's chat template (ChatML with a default system turn).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
_CHATML_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = ["You are a helpful AI assistant named SmolLM, trained by Hugging Face",
           "system user assistant question answer what is the capital of france paris lyon",
           "a short reply yes no maybe context number seven eight helpful kind rude wrong"]


def build_tiny_chat_llama(directory: Path, seed: int = 0) -> Path:
    """Save a tiny random Llama shaped like SmolLM2 where it matters to a reward model:
    grouped-query attention (4 query heads share 2 key/value heads), rotary positions, a
    byte-level BPE tokenizer with ChatML special tokens and SmolLM2's chat template, and no pad
    token in the tokenizer or the config (so prefprune pads with ``<|im_end|>``, the token
    that also ends every templated turn)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(_CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=_CHATML_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = SMOLLM2_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                         max_position_embeddings=256, num_labels=1, pad_token_id=None,
                         bos_token_id=1, eos_token_id=2)
    LlamaForSequenceClassification(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_chat_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of the tiny SmolLM2-shaped Llama (see :func:`build_tiny_chat_llama`)."""
    return build_tiny_chat_llama(tmp_path_factory.mktemp("backbones") / "chat_llama")


@pytest.fixture(scope="session")
def tiny_lm(tiny_chat_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SmolLM2-shaped Llama as a causal LM (its own seeded LM head), which is what
    TRL's DPOTrainer loads."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("backbones") / "chat_llama_lm"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig.from_pretrained(tiny_chat_llama)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_chat_llama).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_backbones(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Paths of tiny BERT-, GPT-2- and Llama-style backbones."""
    root = tmp_path_factory.mktemp("backbones")
    return {kind: build_tiny_backbone(kind, root / kind) for kind in TINY_KINDS}


@pytest.fixture(scope="session")
def tiny_bert(tiny_backbones: dict[str, Path]) -> Path:
    return tiny_backbones["bert"]


@pytest.fixture(scope="session")
def still_bert(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT without dropout: dropout masks depend on batch shapes and on which rows
    a process sees, which would make equal computations differ for reasons unrelated to the
    arithmetic under test."""
    import json
    import shutil

    directory = tmp_path_factory.mktemp("still") / "bert"
    shutil.copytree(tiny_bert, directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="session")
def toy_pairs():
    """Twelve short pairs in canonical columns, with prompts of mixed length."""
    import datasets

    prompts = [f"question {i}: " + "context " * (i % 5) for i in range(12)]
    return datasets.Dataset.from_dict({
        "id": [f"p{i}" for i in range(12)],
        "prompt": prompts,
        "chosen": [f"a helpful answer number {i}" for i in range(12)],
        "rejected": [f"bad {i}" for i in range(12)],
    })
