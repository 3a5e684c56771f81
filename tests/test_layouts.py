"""The layouts people's preference data comes in: TRL's conversational and implicit-prompt
formats and A/B + label layouts, with malformed rows, round trips through prune, and the
rendering of message lists a model is trained and scored with."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from helpers import run_cli

from prefprune.data import PLAIN, DataOptions, load_preferences
from prefprune.data.messages import ChatTemplateRendering, rendering_for, shared_text
from prefprune.data.pairwise import flip_label
from prefprune.pruning import PruneConfig, prune_source


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def check_account(loaded, kept: int, reasons: dict[str, int]) -> None:
    report = loaded.report
    assert report.read == report.kept + len(report.skipped)
    assert report.kept == kept and report.by_reason() == reasons


CONVERSATIONAL = [
    {"prompt": [{"role": "system", "content": "Be brief."}, user("What colour is the sky?")],
     "chosen": [assistant("Blue.")], "rejected": [assistant("Green.")]},
    {"prompt": [user("Hi"), assistant("Hello!"), user("Name a fruit")],
     "chosen": [assistant("Apple")], "rejected": [assistant("Rock")]},
    {"prompt": [user("no content here"), {"role": "user"}],  # malformed: no content
     "chosen": [assistant("a")], "rejected": [assistant("b")]},
    {"prompt": [user("q")], "chosen": "a plain string", "rejected": [assistant("b")]},
    {"prompt": [user("q")], "chosen": [{"role": 3, "content": "x"}], "rejected": [assistant("y")]},
]


def test_conversational_layout(tmp_path):
    source = tmp_path / "conv.jsonl"
    write_jsonl(source, CONVERSATIONAL)
    loaded = load_preferences(source)
    assert loaded.report.format == "generic"
    check_account(loaded, 2, {"malformed_message": 2, "wrong_type": 1})
    first = loaded.dataset[0]
    assert first["prompt"] == "System: Be brief.\n\nUser: What colour is the sky?\n\nAssistant:"
    assert (first["chosen"], first["rejected"]) == (" Blue.", " Green.")
    messages = {row.field: row.detail for row in loaded.report.skipped}
    assert "prompt[1] has no content" in messages["prompt[1]"]
    assert "a string where the row's other fields are message lists" in messages["chosen"]
    assert "no role string" in messages["chosen[0]"]


IMPLICIT = [
    {"chosen": "The sky is blue.", "rejected": "The sky is green."},
    {"chosen": [user("Colour of grass?"), assistant("Green.")],
     "rejected": [user("Colour of grass?"), assistant("Purple.")]},
    {"chosen": "Completely different", "rejected": "Nothing shared"},  # no shared prompt
    {"chosen": [user("a"), assistant("b")], "rejected": [user("c"), assistant("d")]},
    {"chosen": "Same text here", "rejected": "Same text here"},
]


def test_implicit_prompt_layout(tmp_path):
    source = tmp_path / "implicit.jsonl"
    write_jsonl(source, IMPLICIT)
    loaded = load_preferences(source)
    assert loaded.report.format == "implicit"
    check_account(loaded, 2, {"no_shared_prompt": 3})
    text, conversation = loaded.dataset[0], loaded.dataset[1]
    assert (text["prompt"], text["chosen"], text["rejected"]) == \
        ("The sky is", " blue.", " green.")
    assert conversation["prompt"] == "User: Colour of grass?\n\nAssistant:"
    assert conversation["chosen"] == " Green."
    assert shared_text("black cat", "blue cat") == 0  # a word is never split


PAIRWISE = [
    {"question": "Capital of France?", "answer_a": "Paris", "answer_b": "Lyon",
     "overall_preference": -2},
    {"question": "2 + 2?", "answer_a": "5", "answer_b": "4", "overall_preference": 3},
    {"question": "Colour?", "answer_a": "red", "answer_b": "blue", "overall_preference": 0},
    {"question": "Odd?", "answer_a": "x", "answer_b": "y", "overall_preference": "n/a"},
]


def test_graded_preferences_by_sign(tmp_path):
    source = tmp_path / "graded.jsonl"
    write_jsonl(source, PAIRWISE)
    mapping = {"prompt": "question", "response_a": "answer_a", "response_b": "answer_b",
               "label": "overall_preference"}
    loaded = load_preferences(source, DataOptions(columns=mapping,
                                                      label_values=("negative", "positive")))
    assert loaded.report.format == "pairwise"
    check_account(loaded, 2, {"tie_label": 1, "unknown_label": 1})
    assert (loaded.dataset[0]["chosen"], loaded.dataset[1]["chosen"]) == ("Paris", "4")
    assert loaded.dataset[0]["overall_preference"] == -2  # the label stays as evidence
    exact = load_preferences(source, DataOptions(columns=mapping, label_values=("-2", "3")))
    assert exact.report.kept == 2
    default = load_preferences(source, DataOptions(columns=mapping))
    details = [row.detail for row in default.report.skipped]
    assert any("label -2 is not one of 0/a/A/model_a" in d for d in details)


ARENA = [
    {"conversation_a": [user("Tell a joke"), assistant("Why did the chicken...")],
     "conversation_b": [user("Tell a joke"), assistant("No.")], "winner": "model_a"},
    {"conversation_a": [user("Sum 1+1"), assistant("3")],
     "conversation_b": [user("Sum 1+1"), assistant("2")], "winner": "model_b"},
    {"conversation_a": [user("Hi"), assistant("Hey")],
     "conversation_b": [user("Hi"), assistant("Yo")], "winner": "tie (bothbad)"},
]


def test_arena_battles(tmp_path):
    source = tmp_path / "arena.parquet"
    pd.DataFrame(ARENA).to_parquet(source)
    mapping = {"response_a": "conversation_a", "response_b": "conversation_b",
               "label": "winner"}
    loaded = load_preferences(source, DataOptions(columns=mapping))
    check_account(loaded, 2, {"tie_label": 1})
    assert loaded.dataset[1]["chosen"] == " 2" and loaded.dataset[1]["rejected"] == " 3"
    assert loaded.dataset[0]["prompt"] == "User: Tell a joke\n\nAssistant:"


def test_labels_flip_in_their_own_convention():
    assert flip_label(0, None) == 1 and flip_label("model_b", None) == "model_a"
    assert flip_label("A", None) == "B" and flip_label(1.0, None) == 0.0
    assert flip_label(-1, ("-1", "1")) == 1 and flip_label("-1", ("-1", "1")) == "1"
    assert flip_label(-2, ("negative", "positive")) == 2


@pytest.mark.parametrize(("name", "rows", "options", "suffix"), [
    ("conversational", CONVERSATIONAL, {}, ".jsonl"),
    ("implicit", IMPLICIT, {}, ".jsonl"),
    ("graded", PAIRWISE, {"columns": {"prompt": "question", "response_a": "answer_a",
                                      "response_b": "answer_b", "label": "overall_preference"},
                          "label_values": ("negative", "positive")}, ".jsonl"),
    ("arena", ARENA, {"columns": {"response_a": "conversation_a",
                                  "response_b": "conversation_b", "label": "winner"}},
     ".parquet"),
])
def test_round_trip_through_prune(tmp_path, name, rows, options, suffix):
    """Remove one pair and relabel another: the rest comes back unchanged, the relabelled
    pair reads with chosen and rejected swapped, the removed one is gone."""
    source = tmp_path / f"{name}{suffix}"
    if suffix == ".jsonl":
        write_jsonl(source, rows)
    else:
        pd.DataFrame(rows).to_parquet(source)
    options = DataOptions(**options)
    before = load_preferences(source, options)
    ids = before.dataset["id"]
    scores = pd.DataFrame({"id": ids, "loss": [float(i) for i in range(len(ids))]})
    top_pair = PruneConfig(by="loss", fraction=1 / len(ids) - 1e-9)
    removed = prune_source(scores, source, tmp_path / "removed", top_pair,
                           data_options=options)
    relabelled = prune_source(scores, source, tmp_path / "relabelled",
                              top_pair.replace(relabel=True), data_options=options)
    (top,) = removed.selection.ids
    after = load_preferences(removed.rewrite.output, options)
    assert after.report.kept == before.report.kept - 1 and top not in after.dataset["id"]
    assert len(after.report.skipped) == len(before.report.skipped)  # skipped rows kept
    flipped = load_preferences(relabelled.rewrite.output, options).dataset
    old = {row["id"]: row for row in before.dataset}
    for row in flipped:
        original = old.get(row["id"])
        if original is None:  # a relabelled row's content changed, so may its hashed id
            continue
        assert (row["prompt"], row["chosen"], row["rejected"]) == \
            (original["prompt"], original["chosen"], original["rejected"])
    swapped = [(r["chosen"], r["rejected"]) for r in flipped]
    assert (old[top]["rejected"], old[top]["chosen"]) in swapped


def test_chat_template_rendering(tiny_backbones):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_backbones["llama"])
    assert rendering_for(tokenizer) is PLAIN  # no template: the documented plain rendering
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                               "{% endfor %}{% if add_generation_prompt %}<|assistant|>"
                               "{% endif %}")
    rendering = rendering_for(tokenizer)
    assert isinstance(rendering, ChatTemplateRendering)
    assert rendering.render([user("hi")], cue=True) == "<|user|>hi<|assistant|>"


def test_a_conversational_model_scores_and_retrains_with_its_rendering(tmp_path,
                                                                       tiny_backbones):
    """Train on message lists with a backbone that has a chat template: the model records the
    rendering, scoring the saved model reads the data the same way, and the experiment's
    retrains do too."""
    import shutil

    from transformers import AutoTokenizer

    backbone = tmp_path / "llama-chat"
    shutil.copytree(tiny_backbones["llama"], backbone)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    tokenizer.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n"
                               "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    tokenizer.save_pretrained(backbone)
    rows = []
    for i in range(40):
        good, bad = ("helpful kind answer", "rude wrong answer") if i % 2 else \
            ("clear useful reply", "vague broken reply")
        rows.append({"prompt": [user(f"question number {i} about things")],
                     "chosen": [assistant(f"{good} {i}")],
                     "rejected": [assistant(f"{bad} {i}")]})
    source = tmp_path / "conversations.jsonl"
    write_jsonl(source, rows)
    common = ("--backbone", backbone, "--max-length", "48", "--lora-layers", "1", "--epochs", "1",
              "--quiet")
    trained = run_cli("train", source, "--output", tmp_path / "m", *common)
    assert trained.exit_code == 0, trained.output
    recorded = json.loads((tmp_path / "m" / "prefprune.json").read_text())["metadata"]
    expected = ChatTemplateRendering(tokenizer).name
    assert recorded["rendering"] == expected
    scored = run_cli("score", source, "--model", tmp_path / "m", "--output",
                     tmp_path / "s.parquet", "--scores", "loss,grad_cos", "--quiet")
    assert scored.exit_code == 0, scored.output
    assert "warning" not in scored.stderr
    assert json.loads((tmp_path / "s.json").read_text())["rendering"] == expected
    experiment = run_cli("experiment", source, "--output", tmp_path / "exp", *common,
                         "--seeds", "0", "--fractions", "0.2", "--scores", "loss,random",
                         "--no-helpful", "--no-relabel")
    assert experiment.exit_code == 0, experiment.output
    results = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert results["data"]["rendering"] == expected
    model_meta = json.loads((tmp_path / "exp" / "models" / "seed0" / "prefprune.json")
                            .read_text())
    assert model_meta["config"]["backbone"] == str(backbone)


def test_hh_transcripts_are_conversations_for_a_chat_model(tmp_path, tiny_chat_llama):
    """A backbone with a chat template reads HH turns as user/assistant messages in its own
    template; the plain rendering keeps the transcript text as it is."""
    from prefprune.model.loading import load_tokenizer

    source = tmp_path / "hh.jsonl"
    prompt = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How do I bake bread?"
    write_jsonl(source, [{"chosen": f"{prompt}\n\nAssistant: Knead, rise, bake.",
                          "rejected": f"{prompt}\n\nAssistant: No."}])
    plain = load_preferences(source).dataset[0]
    assert plain["prompt"] + plain["chosen"] == f"{prompt}\n\nAssistant: Knead, rise, bake."
    rendering = rendering_for(load_tokenizer(str(tiny_chat_llama), False))
    chat = load_preferences(source, rendering=rendering).dataset[0]
    assert chat["prompt"].count("<|im_start|>user\n") == 2
    assert chat["prompt"].endswith("<|im_start|>assistant\n")
    assert "Human:" not in chat["prompt"] and chat["chosen"].startswith("Knead, rise, bake.")
    assert chat["rejected"].startswith("No.<|im_end|>")


def test_an_empty_response_is_skipped_whatever_the_rendering(tmp_path, tiny_chat_llama):
    """A chat template wraps an empty assistant message in its markers; the row is still an
    empty response. Read with SmolLM2's template, four HH rows with an empty chosen answer
    were once kept, and the extra rows reshuffled every split, so two backbones no longer
    trained and tested on the same pairs."""
    from prefprune.data.splits import split_preferences
    from prefprune.model.loading import load_tokenizer

    prompt = "\n\nHuman: Question {}?"
    rows = [{"chosen": f"{prompt.format(i)}\n\nAssistant: {'' if i % 5 == 0 else 'Yes.'}",
             "rejected": f"{prompt.format(i)}\n\nAssistant: No."} for i in range(40)]
    source, messages = tmp_path / "hh.jsonl", tmp_path / "messages.jsonl"
    write_jsonl(source, rows)
    write_jsonl(messages, [*CONVERSATIONAL[:2], {"prompt": [user("Hi")], "chosen": [
        assistant("  ")], "rejected": [assistant("Hello")]}])
    rendering = rendering_for(load_tokenizer(str(tiny_chat_llama), False))
    plain, chat = load_preferences(source), load_preferences(source, rendering=rendering)
    for loaded in (plain, chat):
        check_account(loaded, kept=32, reasons={"empty_field": 8})
    check_account(load_preferences(messages, rendering=rendering), kept=2,
                  reasons={"empty_field": 1})
    for seed in range(3):
        splits = [split_preferences(x.dataset, fractions=(0.4, 0.15, 0.45), seed=seed)
                  for x in (plain, chat)]
        assert all(splits[0][s]["source_row"] == splits[1][s]["source_row"] for s in splits[0])
