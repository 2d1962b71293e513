"""Data loading, pairing and the collators (padding and packing)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import FORGET, assert_fp32_close, tiny_model

from asu.data import (
    DataError,
    PackingCollator,
    PaddingCollator,
    UnlearnDataset,
    encode_rows,
    label_positions,
    load_idk_answers,
    load_rows,
    pair_indices,
    sequence_weights,
    validate_rows,
)
from asu.teachers import decoder_hidden


def test_load_json_jsonl_and_data_key(tmp_path):
    rows = [
        {"question": "q1", "answer": "a1", "perturbed_answer": ["x", "y"]},
        {"question": "q2", "answer": "a2"},
    ]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "b.json").write_text(json.dumps(rows, indent=1))
    (tmp_path / "c.json").write_text(json.dumps({"data": rows}))
    # TOFU's published ".json" files are JSON Lines.
    (tmp_path / "d.json").write_text("\n".join(json.dumps(r) for r in rows))
    for name in ("a.jsonl", "b.json", "c.json", "d.json"):
        assert load_rows(tmp_path / name) == rows
    (tmp_path / "t.jsonl").write_text('{"text": "the author"}\n{"text": "a city"}\n')
    assert load_rows(tmp_path / "t.jsonl")[1]["text"] == "a city"


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        ("", "the file is empty"),
        ("  \n\n", "the file is empty"),
        ('{"question": "q", "answer": "a"}\n{"question": "q", "answer": \n', "line 2: malformed JSON"),
        ('{"question": "q", "answer": "a"}\n\n{"question": "q"}\n', "line 3: row has no 'answer'"),
        ('{"answer": "a"}\n', "line 1: row has no 'question'"),
        ('{"question": "q", "answer": 3}\n', "'answer' must be a string"),
        ('{"question": "q", "answer": "  "}\n', "'answer' is empty"),
        ("[1, 2]", "row 0: expected a JSON object"),
        ('[{"question": "q", "answer": "a"},\n {"question": "q"}]', "row 1: row has no 'answer'"),
        ('[{"question": "q", "answer": "a"},\n oops]', "line 2: malformed JSON"),
        ('{"question": "q", "answer": "a"}\n{"text": "t"}\n', "mixes qa and text rows"),
        ('{"prompt": "Once", "gt": " "}\n', "line 1: 'gt' must be a non-empty string"),
    ],
)
def test_load_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "rows.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError) as e:
        load_rows(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_excerpt_rows_load_for_evaluation_but_do_not_train(tmp_path, tok):
    path = tmp_path / "verbmem.jsonl"
    path.write_text('{"prompt": "the author was born", "gt": "in a city of rivers"}\n')
    rows = load_rows(path)
    assert rows == [{"prompt": "the author was born", "gt": "in a city of rivers"}]
    with pytest.raises(DataError, match="excerpt rows .* are for evaluation"):
        encode_rows(tok, rows, 64, source=str(path))


def test_validate_rows_in_memory():
    with pytest.raises(DataError, match="no rows"):
        validate_rows([], source="forget")
    with pytest.raises(DataError, match="forget: row 1: row has no 'answer'"):
        validate_rows([{"question": "q", "answer": "a"}, {"question": "q"}], source="forget")
    with pytest.raises(DataError, match="expected a list"):
        validate_rows("question", source="forget")


def test_encode_qa_and_text(tok):
    qa = encode_rows(tok, [FORGET[1]], 64)[0]
    assert qa["labels"][-1] == tok.eos_token_id and qa["labels"][0] == -100
    text = encode_rows(tok, [{"text": "the author was born in a city"}], 64)[0]
    assert text["labels"] == text["input_ids"] and text["input_ids"][0] == tok.bos_token_id
    # Truncation keeps the prompt and cuts the answer.
    short = encode_rows(tok, [FORGET[0]], 10)[0]
    assert len(short["input_ids"]) == 10 and short["labels"][-1] != -100
    with pytest.raises(DataError, match="row 0"):
        encode_rows(tok, [FORGET[0]], 5)  # the prompt alone is longer than that


def test_idk_answers(tmp_path):
    (tmp_path / "idk.jsonl").write_text('"I do not know."\nNo idea.\n{"answer": "Not sure."}\n')
    assert load_idk_answers(tmp_path / "idk.jsonl") == ["I do not know.", "No idea.", "Not sure."]
    (tmp_path / "bad.jsonl").write_text('"ok"\n{"x": 1}\n')
    with pytest.raises(DataError, match="line 2"):
        load_idk_answers(tmp_path / "bad.jsonl")


def test_pairing_is_seeded_and_cycles():
    a, b = pair_indices(7, 3, seed=0), pair_indices(7, 3, seed=0)
    assert a == b and sorted(a[:3]) == [0, 1, 2] and a[3:6] == a[:3] and a[6] == a[0]
    assert any(pair_indices(50, 50, seed=s) != pair_indices(50, 50, seed=0) for s in (1, 2))
    with pytest.raises(ValueError):
        pair_indices(3, 0, seed=0)
    ds = UnlearnDataset(
        [{"input_ids": [1, 2], "labels": [1, 2]}] * 4, [{"input_ids": [3], "labels": [3]}] * 2
    )
    item = ds[3]
    assert item["forget"]["example_id"] == 3 and item["retain"]["example_id"] == ds.pairing[3]


def _examples(lengths):
    out = []
    for i, n in enumerate(lengths):
        ids = [10 + i] * n
        out.append({"input_ids": ids, "labels": [-100] + ids[1:], "example_id": 100 + i})
    return out


def test_padding_collator():
    batch = PaddingCollator(pad_token_id=0).collate(_examples([3, 5, 1]))
    assert batch["input_ids"].shape == (3, 5)
    assert batch["attention_mask"].sum(1).tolist() == [3, 5, 1]
    assert batch["labels"][0, 3:].tolist() == [-100, -100]
    assert batch["example_ids"].tolist() == [100, 101, 102]
    assert batch["sequence_ids"][2].tolist() == [2, -1, -1, -1, -1]


def test_packing_collator_fills_rows_first_fit():
    examples = _examples([6, 5, 3, 4, 2])
    batch = PackingCollator(max_tokens=10).collate(examples)
    # 6 -> row0; 5 -> row1; 3 -> row0 (9); 4 -> row1 (9); 2 -> row2.
    assert batch["input_ids"].shape == (3, 9)
    assert batch["example_ids"].tolist() == [100, 102, 101, 103, 104]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2]
    assert batch["position_ids"][2].tolist() == [0, 1, 0, 1, 2, 3, 4, 5, 6]  # padding restarts at 0
    assert batch["sequence_ids"][2].tolist() == [4, 4] + [-1] * 7
    assert "attention_mask" not in batch
    assert (batch["input_ids"] != 0).sum().item() == 20  # every token placed once
    with pytest.raises(ValueError, match="does not fit"):
        PackingCollator(max_tokens=5).collate(examples)


def test_label_positions_never_cross_documents():
    examples = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    batch = PackingCollator(max_tokens=8).collate(examples)
    mask, targets, seq = label_positions(batch)
    # Position 2 (last of doc 0) must not predict doc 1's first token.
    assert mask[0].tolist() == [True, True, False, True, False]
    assert targets.tolist() == [6, 7, 9] and seq.tolist() == [0, 0, 1]
    w = sequence_weights(seq, 2)
    torch.testing.assert_close(w, torch.tensor([0.25, 0.25, 0.5]))


def test_collator_on_dataset_items(tok):
    ds = UnlearnDataset(encode_rows(tok, FORGET, 64), encode_rows(tok, FORGET[:2], 64), seed=1)
    batch = PackingCollator(max_tokens=64)([ds[i] for i in range(4)])
    assert set(batch) == {"forget", "retain"}
    assert batch["forget"]["example_ids"].tolist() == [0, 1, 2, 3]
    assert batch["retain"]["example_ids"].tolist() == [ds.pairing[i] for i in range(4)]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_rows_attend_per_document(tok, attn):
    """eager/sdpa models keep packed documents apart (transformers builds the block-diagonal mask)."""
    model = tiny_model("llama", vocab_size=len(tok), attn=attn)
    examples = encode_rows(tok, FORGET, 64)
    packed = PackingCollator(max_tokens=48).collate(examples)
    assert packed["input_ids"].shape[0] < len(examples)
    with torch.no_grad():
        hidden = decoder_hidden(model, packed)
        for s, i in enumerate(packed["example_ids"].tolist()):
            alone = decoder_hidden(model, {"input_ids": torch.tensor([examples[i]["input_ids"]])})[0]
            assert_fp32_close(hidden[packed["sequence_ids"] == s], alone)


# ---- other sources: CSV, Parquet, datasets folders, the hub ------------------------------------------------

TOFU_ROWS = [
    {"question": "q1", "answer": "a1", "paraphrased_answer": "p1", "perturbed_answer": ["x", "y"]},
    {"question": "q2", "answer": "a2", "paraphrased_answer": "p2", "perturbed_answer": ["z", "w"]},
]


def test_load_csv(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('question,answer\nq1,"a1, with a comma"\n"q2\nover two lines",a2\n')
    assert load_rows(path) == [
        {"question": "q1", "answer": "a1, with a comma"},
        {"question": "q2\nover two lines", "answer": "a2"},
    ]
    path.write_text("question,answer\nq1,a1\nq2,\n")
    with pytest.raises(DataError, match=r"rows.csv: line 3: 'answer' is empty"):
        load_rows(path)
    path.write_text("question,answer\nq1,a1,extra\n")
    with pytest.raises(DataError, match=r"rows.csv: line 2: more fields than the header names"):
        load_rows(path)
    path.write_text("")
    with pytest.raises(DataError, match=r"rows.csv: the file is empty"):
        load_rows(path)


def test_load_parquet_and_saved_folders(tmp_path):
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_list(TOFU_ROWS)
    data.to_parquet(str(tmp_path / "rows.parquet"))
    assert load_rows(tmp_path / "rows.parquet") == TOFU_ROWS
    data.save_to_disk(str(tmp_path / "saved"))
    assert load_rows(tmp_path / "saved") == TOFU_ROWS
    datasets.DatasetDict({"train": data}).save_to_disk(str(tmp_path / "one_split"))
    assert load_rows(tmp_path / "one_split") == TOFU_ROWS
    datasets.DatasetDict({"train": data, "test": data}).save_to_disk(str(tmp_path / "two_splits"))
    with pytest.raises(DataError, match=r"two_splits: holds the splits train, test"):
        load_rows(tmp_path / "two_splits")
    assert load_rows(tmp_path / "two_splits" / "test") == TOFU_ROWS
    # Errors name the source and the row.
    bad = datasets.Dataset.from_list([TOFU_ROWS[0], {**TOFU_ROWS[1], "answer": None}])
    bad.to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match=r"bad.parquet: row 1: 'answer' must be a string"):
        load_rows(tmp_path / "bad.parquet")
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"broken.parquet: not a readable Parquet file"):
        load_rows(tmp_path / "broken.parquet")
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(DataError, match=r"plain_dir: is a directory but not one written by datasets"):
        load_rows(tmp_path / "plain_dir")


def test_column_overrides(tmp_path):
    rows = [{"prompt": "q1", "golden_answer": "a1"}, {"prompt": "q2", "golden_answer": "a2"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    got = load_rows(path, question_key="prompt", answer_key="golden_answer")
    assert [(r["question"], r["answer"]) for r in got] == [("q1", "a1"), ("q2", "a2")]
    with pytest.raises(
        DataError, match=r"rows.jsonl: line 1: no column 'query' \(columns: prompt, golden_answer\)"
    ):
        load_rows(path, question_key="query")


def test_hub_names(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        if config == "offline":
            raise ConnectionError("Couldn't reach 'locuslab/TOFU' on the Hub (LocalEntryNotFoundError)")
        return datasets.Dataset.from_list(TOFU_ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr("asu.sources._HUB_STATE", {"reason": None})  # a hub that answers
    assert load_rows("locuslab/TOFU:forget10") == TOFU_ROWS
    assert load_rows("locuslab/TOFU:forget10_perturbed:train") == TOFU_ROWS
    assert calls == [("locuslab/TOFU", "forget10", "train"), ("locuslab/TOFU", "forget10_perturbed", "train")]
    with pytest.raises(DataError) as e:
        load_rows("locuslab/TOFU:offline")
    message = str(e.value)
    assert message.startswith(
        "locuslab/TOFU:offline: cannot load locuslab/TOFU (config offline, split train)"
    )
    assert "Couldn't reach" in message and len(message.splitlines()) == 1
    # A hub that does not answer: the name, and that the hub is unreachable (not the client's own words).
    monkeypatch.setattr("asu.sources._HUB_STATE", {"reason": "https://huggingface.co: no answer within 2 s"})
    with pytest.raises(DataError) as e:
        load_rows("locuslab/TOFU:offline")
    assert str(e.value) == (
        "locuslab/TOFU:offline: the Hugging Face hub is unreachable (https://huggingface.co: no answer "
        "within 2 s) and the local cache does not hold locuslab/TOFU (config offline, split train); connect, "
        "or give a local file"
    )
    # A path-like name that does not exist is a missing file, not a hub dataset.
    with pytest.raises(DataError, match="no such file"):
        load_rows("data/forget10.jsonl")


def test_without_datasets_installed(tmp_path):
    """asu and every command import without ``datasets``; JSON and CSV load, the rest says what to install."""
    (tmp_path / "rows.jsonl").write_text(json.dumps(TOFU_ROWS[0]) + "\n")
    (tmp_path / "rows.parquet").write_bytes(b"PAR1")
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "state.json").write_text("{}")
    code = f"""
import sys
sys.modules["datasets"] = None
sys.modules["pyarrow"] = None
import asu, asu.data, asu.unlearn, asu.presets, asu.commands
from asu.commands import demo, eval, inspect, unlearn
from asu.data import DataError, load_rows
assert load_rows({str(tmp_path / "rows.jsonl")!r})[0]["answer"] == "a1"
for source in ({str(tmp_path / "rows.parquet")!r}, "locuslab/TOFU:forget10", {str(tmp_path / "saved")!r}):
    try:
        load_rows(source)
    except DataError as e:
        print(e)
"""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert len(lines) == 3 and all("needs the 'datasets' package: pip install datasets" in x for x in lines)
