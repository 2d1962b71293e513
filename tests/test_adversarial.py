"""Hostile and unlucky inputs through the real ``asu`` entry point: nothing breaks, nothing is lost.

Every case runs ``asu <command> ...`` as a user does: :func:`asu.commands.main` in this process (the console
script's function, its exit status and stderr) or ``python -m asu.commands`` in a subprocess where only a
process will do (a run stopped by a NaN, Ctrl-C, two runs at once). Each asserts one error line and no
traceback, the exit status (2 for a refused input, 130 for Ctrl-C), untouched inputs (the model folder and
data files hashed before and after) and an output folder left as it was found.

The classes: malformed data and arguments in every command (inspect had no error boundary), validation
before any write (eval wrote files before checking --temperature / --layers), truncated, garbled and NaN
model files, a training run that goes NaN, --out inside or around --model, two runs into one --out,
--resume with other data, a shared teacher cache at two temperatures and a truncated cache file, a 50 MB
row, encoding errors and unpaired surrogates, Ctrl-C, and what a killed run leaves behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import FORGET, RETAIN, tiny_model, tiny_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import TrainerCallback

from asu.commands import main
from asu.data import DataError, encode_rows, load_rows
from asu.distributed import complete_checkpoints
from asu.files import LOCK_FILE
from asu.models import load_model, load_tokenizer
from asu.unlearn import UnlearnConfig, check_output_dir, unlearn

ROOT = Path(__file__).resolve().parents[1]
#: Quick training flags: 5 forget rows, batch 2, one epoch = 3 optimizer steps.
TRAIN = ["--epochs", "1", "--batch-size", "2", "--grad-accum", "1", "--max-length", "64", "--no-progress"]
EVAL = ["--max-new-tokens", "4", "--batch-size", "8", "--no-progress"]
FAST = dict(epochs=1, batch_size=2, grad_accum=1, lr=1e-3, max_length=64, progress=False)


# ---- inputs, and what must not change --------------------------------------------------------------------


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _eval_rows(rows: list[dict]) -> list[dict]:
    """QA rows with the fields TOFU's metrics read (paraphrase, perturbed answers)."""
    return [{**r, "paraphrased_answer": r["answer"], "perturbed_answer": [r["answer"][::-1]]} for r in rows]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A tiny model folder, broken copies of it, and forget/retain rows (shared by the whole module)."""
    root = tmp_path_factory.mktemp("inputs")
    tok = tiny_tokenizer()
    model = tiny_model(vocab_size=len(tok))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    for name in ("truncated", "garbled", "nan"):
        shutil.copytree(root / "model", root / name)
    weights = root / "truncated" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    with open(root / "garbled" / "model.safetensors", "r+b") as f:
        f.seek(12)
        f.write(b"\xff\xfe" * 16)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    model.save_pretrained(root / "nan")
    return {
        "root": root,
        "model": root / "model",
        "forget": _jsonl(root / "forget.jsonl", _eval_rows(FORGET)),
        "retain": _jsonl(root / "retain.jsonl", _eval_rows(RETAIN)),
    }


def tree_digest(path: Path) -> str:
    """SHA-256 over every file under ``path`` (names and contents): an input that must not change."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        digest.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
        digest.update(p.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def untouched(inputs):
    """Fails the test if it changed the model folder or the data files."""
    before = {k: tree_digest(v) for k, v in inputs.items() if k != "root"}
    yield
    assert {k: tree_digest(inputs[k]) for k in before} == before, "an input changed"


def error_line(err: str, command: str) -> str:
    """The one line ``asu <command>: error: ...`` of ``err`` (other lines may be library warnings)."""
    assert "Traceback" not in err, err
    ours = [line for line in err.splitlines() if line.startswith("asu ")]
    assert len(ours) == 1 and ours[0].startswith(f"asu {command}: error: "), err
    return ours[0]


def run_main(capsys, *argv: object) -> tuple[int, str]:
    """``asu ARGV`` in this process: the exit status and stderr."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


ENV = {**os.environ, "ASU_KERNELS_BACKEND": "reference", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _as_in_a_terminal() -> None:
    """Ctrl-C as a user's terminal delivers it: a test suite started in the background (``cmd &`` in a
    shell without job control, as CI runners may do) inherits SIGINT ignored, and Python keeps an ignored
    SIGINT ignored, so the child would never see the KeyboardInterrupt the test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def asu_process(*argv: object, wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    """``python -m asu.commands ARGV`` in a subprocess (the kernels' reference path, one thread)."""
    cmd = [sys.executable, "-m", "asu.commands", *map(str, argv)]
    if not wait:
        return subprocess.Popen(
            cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=_as_in_a_terminal,
        )  # fmt: skip
    return subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)


# ---- every command refuses bad input in one line, before writing anything -------------------------------


def _write_bad_files(tmp: Path) -> None:
    """The hostile files the cases name, in ``tmp``."""
    (tmp / "bad.jsonl").write_text(json.dumps(FORGET[0]) + "\n{question: oops\n")
    latin1 = json.dumps(FORGET[0]).encode() + b'\n{"question": "caf\xe9?", "answer": "yes"}\n'
    (tmp / "latin1.jsonl").write_bytes(latin1)
    (tmp / "latin1.csv").write_bytes(b"question,answer\nwho?,me\nwhere?,caf\xe9\n")
    (tmp / "surrogate.jsonl").write_text('{"question": "who?", "answer": "\\ud800 broken"}\n')
    (tmp / "number.jsonl").write_text('{"question": "who?", "answer": 42}\n')
    (tmp / "a_file").write_text("not a folder")


def _cases(inputs: dict[str, Path], tmp: Path) -> dict[str, tuple[str, list, str]]:
    """name -> (command, argv after the command, a piece of the error line). ``--out`` is ``tmp/out``; the
    files are :func:`_write_bad_files`'."""
    bad_json, latin1, latin1_csv = tmp / "bad.jsonl", tmp / "latin1.jsonl", tmp / "latin1.csv"
    surrogate, number, a_file = tmp / "surrogate.jsonl", tmp / "number.jsonl", tmp / "a_file"
    m, f, r, root = inputs["model"], inputs["forget"], inputs["retain"], inputs["root"]
    o = ["--out", tmp / "out"]
    unl = ["--model", m, "--forget", f, "--retain", r, *TRAIN]
    ins = ["--model", m, "--data", f, "--max-length", "48"]
    ev = ["--model", m, "--data", f, "--retain", r, *EVAL]
    muse = ["--model", m, "--benchmark", "muse", "--data", f]
    broken, nan = "model.safetensors: not a readable safetensors file", "non-finite"
    return {
        # asu inspect had no error boundary: each of these was a traceback.
        "inspect missing data": ("inspect", [*ins, "--data", tmp / "nope.jsonl", *o], "no such file"),
        "inspect malformed data": ("inspect", [*ins, "--data", bad_json, *o], "line 2: malformed JSON"),
        "inspect bad temperature": ("inspect", [*ins, "--temperature", "2,x", *o], "cannot parse"),
        "inspect bad layers": ("inspect", [*ins, "--layers", "5-9", *o], "out of range"),
        "inspect missing model": ("inspect", [*ins, "--model", tmp / "nope", *o], "does not exist"),
        "inspect out is a file": ("inspect", [*ins, "--out", a_file], "is not a directory"),
        # asu eval wrote its result files before checking these.
        "eval temperature 0": ("eval", [*ev, "--temperature", "0", *o], "--temperature"),
        "eval bad layers": ("eval", [*ev, "--temperature", "2", "--layers", "7", *o], "out of range"),
        "eval out is a file": ("eval", [*ev, "--out", a_file], "is not a directory"),
        "eval bad max length": ("eval", [*ev, "--max-length", "1", *o], "--max-length"),
        "eval unknown attack": ("eval", [*ev, "--attack", "quant:int4", *o], "formats are nf4, fp4, int8"),
        "eval attack on MUSE": ("eval", [*muse, "--attack", "prefix", *o], "--attack applies to TOFU"),
        # Truncated, garbled and NaN model files, in every command.
        "unlearn truncated model": ("unlearn", [*unl, "--model", root / "truncated", *o], broken),
        "eval truncated model": ("eval", [*ev, "--model", root / "truncated", *o], broken),
        "inspect garbled model": ("inspect", [*ins, "--model", root / "garbled", *o], broken),
        "unlearn NaN weights": ("unlearn", [*unl, "--model", root / "nan", *o], nan),
        "eval NaN weights": ("eval", [*ev, "--model", root / "nan", *o], nan),
        "inspect NaN weights": ("inspect", [*ins, "--model", root / "nan", *o], nan),
        # --out that is, lies inside or contains --model (and a cache inside it).
        "unlearn out is model": ("unlearn", [*unl, "--out", m], "is the --model folder"),
        "unlearn out inside model": ("unlearn", [*unl, "--out", m / "unlearned"], "lies inside the --model"),
        "unlearn out contains model": ("unlearn", [*unl, "--out", root], "contains the --model"),
        "unlearn cache inside model": ("unlearn", [*unl, "--cache-dir", m / "c", *o], "--cache-dir"),
        "eval out is model": ("eval", [*ev, "--out", m], "is the --model folder"),
        "inspect out inside model": ("inspect", [*ins, "--out", m / "x"], "lies inside the --model"),
        # Encoding errors and non-string fields name the file and the line.
        "latin-1 JSON Lines": ("unlearn", [*unl, "--forget", latin1, *o],
                               "latin1.jsonl: line 2: not UTF-8 text (byte 0xe9 at byte offset"),
        "latin-1 CSV": ("eval", [*ev, "--data", latin1_csv, *o], "latin1.csv: line 3: not UTF-8 text (byte"),
        "unpaired surrogate": ("inspect", [*ins, "--data", surrogate, *o],
                               "surrogate.jsonl: line 1: 'answer' is not valid Unicode text"),
        "answer not a string": ("unlearn", [*unl, "--forget", number, *o],
                                "number.jsonl: line 1: 'answer' must be a string"),
        "nonfinite steps < 0": ("unlearn", [*unl, "--max-nonfinite-steps", "-1", *o], "max_nonfinite_steps"),
    }  # fmt: skip


CASE_NAMES = list(_cases({k: Path("x") for k in ("model", "forget", "retain", "root")}, Path("/nonexistent")))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_is_one_line_and_writes_nothing(
    name, inputs, tmp_path, capsys, untouched, reference_backend
):
    _write_bad_files(tmp_path)
    command, argv, message = _cases(inputs, tmp_path)[name]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, err = run_main(capsys, command, *argv)
    assert code == 2, err
    assert message in error_line(err, command)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no --out, nothing else either


def test_refusals_through_the_console_entry_point(inputs, tmp_path, untouched):
    """The same refusals as a separate process sees them (exit status, stderr), one per command."""
    out = tmp_path / "out"
    done = asu_process(
        "inspect", "--model", inputs["root"] / "truncated", "--data", inputs["forget"], "--out", out
    )
    assert done.returncode == 2 and "not a readable safetensors file" in error_line(done.stderr, "inspect")
    done = asu_process(
        "eval", "--model", inputs["model"], "--data", inputs["forget"], "--out", inputs["model"]
    )
    assert done.returncode == 2 and "is the --model folder" in error_line(done.stderr, "eval")
    assert not out.exists()


def test_unexpected_errors_hint_at_debug_and_debug_shows_the_traceback(monkeypatch, capsys):
    import asu.commands.inspect as inspect_command

    def broken(args):
        raise RuntimeError("something nobody expected\nsecond line")

    monkeypatch.setattr(inspect_command, "run", broken)
    argv = ["inspect", "--model", "m", "--data", "d", "--out", "o"]
    code, err = run_main(capsys, *argv)
    assert code == 1 and "Traceback" not in err
    assert err.strip() == (
        "asu inspect: error: unexpected RuntimeError: something nobody expected (rerun with --debug for the "
        "traceback)"
    )
    for debug in (["--debug", *argv], [*argv, "--debug"]):  # before or after the subcommand
        code, err = run_main(capsys, *debug)
        assert code == 1 and "Traceback" in err and "RuntimeError: something nobody expected" in err


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=40),
            st.text(max_size=30).map(lambda t: t.encode("utf-8", "surrogatepass")),
            st.dictionaries(
                st.sampled_from(["question", "answer", "text", "prompt", "gt", "x"]),
                st.one_of(st.text(max_size=20), st.integers(), st.none(), st.lists(st.text(max_size=5))),
                max_size=4,
            ).map(lambda d: json.dumps(d, ensure_ascii=True).encode()),
        ),
        max_size=5,
    )
)
def test_malformed_rows_are_refused_with_their_file(tmp_path, lines):
    """Any bytes, any JSON rows: loading and encoding either work or raise a DataError naming the file."""
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join(lines))
    try:
        rows = load_rows(path)
        encode_rows(TOKENIZER, [r for r in rows if "prompt" not in r], 32, source=str(path))
    except DataError as e:
        assert str(e).startswith(str(path)), e


TOKENIZER = tiny_tokenizer()


# ---- training that goes non-finite ---------------------------------------------------------------------


def test_a_run_that_goes_nan_stops_keeps_its_checkpoint_and_writes_no_model(inputs, tmp_path, untouched):
    """``--lr 1e3`` used to print 'done ... final loss 0' and write NaN weights (the Trainer's NaN filter hid
    the loss); now the run stops at the step, keeps the last good checkpoint, writes no model."""
    out = tmp_path / "out"
    argv = ["unlearn", "--model", inputs["model"], "--forget", inputs["forget"], "--retain", inputs["retain"]]
    argv += [*TRAIN, "--epochs", "8", "--lr", "1e3", "--save-steps", "2", "--out", out]
    done = asu_process(*argv)
    assert done.returncode == 2, done.stderr
    line = error_line(done.stderr, "unlearn")
    assert "training stopped at optimizer step" in line and "no model was written" in line
    assert "the last good checkpoint" in line and "--max-nonfinite-steps" in line
    names = set(os.listdir(out))
    assert not names & {"model.safetensors", "run.json", LOCK_FILE}
    kept = complete_checkpoints(str(out / "checkpoints"))
    assert kept and kept[-1] in line
    from safetensors.torch import load_file

    weights = load_file(str(out / "checkpoints" / kept[-1] / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


class PoisonAt(TrainerCallback):
    """Makes one optimizer step's loss NaN (a NaN in the LM head for that step only), like a bad batch."""

    def __init__(self, step: int) -> None:
        self.step, self.saved = step, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            weight = model.student.get_output_embeddings().weight
            self.saved = weight.data[0, 0].item()
            weight.data[0, 0] = float("nan")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.saved is not None:
            model.student.get_output_embeddings().weight.data[0, 0] = self.saved
            self.saved = None


def test_nonfinite_steps_are_skipped_up_to_the_limit(tok, reference_backend):
    cfg = UnlearnConfig(**FAST, max_nonfinite_steps=1)
    model = tiny_model(vocab_size=len(tok))
    result = unlearn(model, tok, FORGET, RETAIN, cfg, callbacks=[PoisonAt(2)])
    assert result.stats["skipped_nonfinite_steps"] == [2] and result.stats["optimizer_steps"] == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())
    cfg = UnlearnConfig(**FAST)
    with pytest.raises(ValueError, match="training stopped at optimizer step 2: the loss is not finite"):
        unlearn(tiny_model(vocab_size=len(tok)), tok, FORGET, RETAIN, cfg, callbacks=[PoisonAt(2)])


# ---- two runs, Ctrl-C, what a killed run leaves ----------------------------------------------------------


def _wait_for_checkpoint(folder: Path, process: subprocess.Popen, seconds: float = 300) -> None:
    end = time.monotonic() + seconds
    while not complete_checkpoints(str(folder)):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < end, f"no checkpoint in {folder}"
        time.sleep(0.2)


def test_second_run_into_a_busy_out_fails_at_once_and_ctrl_c_keeps_checkpoints(inputs, tmp_path, untouched):
    """Two runs into one --out used to race (a finished result silently overwritten, or a RuntimeError when
    the first deleted checkpoints/); Ctrl-C printed a KeyboardInterrupt traceback."""
    out = tmp_path / "out"
    argv = ["unlearn", "--model", inputs["model"], "--forget", inputs["forget"], "--retain", inputs["retain"]]
    # Far more epochs than the test lasts: the first run must still be training when Ctrl-C reaches it,
    # however fast the machine (a tiny model runs 200 epochs in seconds).
    argv += [*TRAIN, "--batch-size", "1", "--epochs", "100000", "--save-steps", "3", "--out", out]
    first = asu_process(*argv, wait=False)
    try:
        _wait_for_checkpoint(out / "checkpoints", first)
        second = asu_process(*argv)
        assert second.returncode == 2
        assert f"is in use by another asu run (pid {first.pid})" in error_line(second.stderr, "unlearn")
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("asu ")] == [
        "asu unlearn: interrupted; completed checkpoints in --out are kept; rerun with --resume to continue"
    ]
    assert complete_checkpoints(str(out / "checkpoints")) and not (out / "run.json").exists()
    assert not (out / LOCK_FILE).exists()
    check_output_dir(str(out), resume=True)  # a resume may continue it


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def _from_files(inputs: dict[str, Path]) -> tuple:
    """What ``asu unlearn`` reads from the input files: model, tokenizer, forget and retain rows."""
    return (
        load_model(inputs["model"]),
        load_tokenizer(inputs["model"]),
        load_rows(inputs["forget"]),
        load_rows(inputs["retain"]),
    )


@pytest.fixture
def interrupted(inputs, tmp_path, reference_backend) -> Path:
    """An output folder holding a run of the input files interrupted at step 3 of 3 (checkpoint-2 kept)."""
    out = tmp_path / "out"
    cfg = UnlearnConfig(**FAST, save_steps=2)
    with pytest.raises(KeyboardInterrupt):
        unlearn(*_from_files(inputs), cfg, str(out), callbacks=[StopAt(3)])
    assert complete_checkpoints(str(out / "checkpoints")) == ["checkpoint-2"]
    return out


def test_a_killed_runs_leftovers_are_removed_on_resume(inputs, interrupted, capsys, untouched):
    out = interrupted
    (out / ".result-k1ll3d00").mkdir()
    (out / ".result-k1ll3d00" / "model.safetensors").write_bytes(b"half")
    (out / ".run.json.a1b2c3d4.tmp.json").write_text("{")
    (out / "notes.md").write_text("the user's own file")
    argv = ["unlearn", "--model", inputs["model"], "--forget", inputs["forget"], "--retain", inputs["retain"]]
    code, err = run_main(capsys, *argv, *TRAIN, "--lr", "1e-3", "--save-steps", "2", "--out", out, "--resume")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert (out / "notes.md").read_text() == "the user's own file" and (out / "run.json").is_file()


def test_resume_with_other_data_or_tokenizer_is_refused(inputs, interrupted, tmp_path, capsys):
    """--resume used to check the settings only: another --forget file resumed and said 'done'."""
    other = _jsonl(tmp_path / "other.jsonl", _eval_rows(FORGET[::-1]))
    argv = ["unlearn", "--model", inputs["model"], "--forget", other, "--retain", inputs["retain"]]
    before = tree_digest(interrupted)
    code, err = run_main(
        capsys, *argv, *TRAIN, "--lr", "1e-3", "--save-steps", "2", "--out", interrupted, "--resume"
    )
    assert code == 2
    assert "cannot resume with different data: forget rows changed" in error_line(err, "unlearn")
    model, tokenizer, forget, retain = _from_files(inputs)
    tokenizer.add_tokens(["novel"])
    with pytest.raises(ValueError, match="different data: tokenizer changed"):
        unlearn(
            model,
            tokenizer,
            forget,
            retain,
            UnlearnConfig(**FAST, save_steps=2),
            str(interrupted),
            resume=True,
        )
    assert tree_digest(interrupted) == before  # the interrupted run is left for a proper resume


def test_eval_removes_stale_temporaries_and_keeps_results(inputs, tmp_path, capsys, untouched):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".summary.json.zz9k2m1q.tmp.json").write_text("{")
    (out / "my_notes.txt").write_text("kept")
    argv = [
        "eval",
        "--model",
        inputs["model"],
        "--data",
        inputs["forget"],
        "--retain",
        inputs["retain"],
        *EVAL,
    ]
    code, err = run_main(capsys, *argv, "--out", out)
    assert code == 0, err
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert (out / "my_notes.txt").read_text() == "kept" and (out / "summary.json").is_file()
    json.loads((out / "TOFU_EVAL.json").read_text())


# ---- the teacher cache -------------------------------------------------------------------------------------


def test_shared_cache_dir_keys_by_fingerprint_and_rebuilds_a_corrupt_file(
    inputs, tmp_path, capsys, caplog, untouched, reference_backend
):
    cache = tmp_path / "cache"
    argv = ["unlearn", "--model", inputs["model"], "--forget", inputs["forget"], "--retain", inputs["retain"]]
    argv += [*TRAIN, "--teacher", "cache", "--cache-dir", cache]

    def run(tau: str, out: str) -> str:
        code, err = run_main(capsys, *argv, "--temperature", tau, "--out", tmp_path / out)
        assert code == 0, err
        return json.loads((tmp_path / out / "run.json").read_text())["stats"]["teacher"]

    run("2", "a")
    first = sorted(cache.iterdir())
    run("5", "b")
    files = sorted(cache.iterdir())
    assert len(first) == 1 and len(files) == 2  # tau 2 and tau 5 never share a file
    assert all(p.name.startswith("forget_smoothed-") for p in files)
    again = run("5", "c")  # same inputs: the verified file is reused, no teacher pass
    assert again["teacher_forward_passes"] == 0 and len(again["cache_files_reused"]) == 1
    tau2 = first[0]
    size = tau2.stat().st_size
    os.truncate(tau2, size - 100)
    with caplog.at_level("WARNING"):
        rebuilt = run("2", "d")
    assert "rebuilding it" in caplog.text and str(tau2) in caplog.text
    assert rebuilt["teacher_forward_passes"] > 0 and tau2.stat().st_size == size


def test_cache_changed_during_a_run_is_one_clear_error(tok, tmp_path):
    from asu.data import PaddingCollator, label_positions
    from asu.teachers import CacheError, build_teacher

    model = tiny_model(vocab_size=len(tok))
    forget = [{**ex, "example_id": i} for i, ex in enumerate(encode_rows(tok, FORGET, 64))]
    teacher = build_teacher(
        "cache", model, 2.0, None, sets={"forget": forget}, needs=[("forget", True)], directory=str(tmp_path)
    )
    batch = PaddingCollator().collate(forget)
    mask = label_positions(batch)[0]
    assert teacher.hidden_states(batch, mask, smoothed=True, part="forget").shape[0] == int(mask.sum())
    (path,) = tmp_path.iterdir()
    os.truncate(path, path.stat().st_size - 64)
    with pytest.raises(CacheError, match="cut short .* resume the run"):
        teacher.hidden_states(batch, mask, smoothed=True, part="forget")


# ---- long rows -----------------------------------------------------------------------------------------


def test_a_50_mb_row_costs_what_a_row_at_the_budget_costs(
    inputs, tmp_path, capsys, untouched, reference_backend
):
    """A 50 MB answer used to be tokenised whole (no answer within 45 s, > 1 GB); eval never truncated."""
    huge = {**_eval_rows(FORGET)[0], "answer": "the author wrote " * (50 * 2**20 // 17)}
    start = time.perf_counter()
    encoded = encode_rows(TOKENIZER, [huge], 64)
    assert time.perf_counter() - start < 5 and len(encoded[0]["input_ids"]) == 64
    forget = _jsonl(tmp_path / "huge.jsonl", [huge, *_eval_rows(FORGET)[1:]])
    start = time.perf_counter()
    argv = ["unlearn", "--model", inputs["model"], "--forget", forget, "--retain", inputs["retain"], *TRAIN]
    code, err = run_main(capsys, *argv, "--out", tmp_path / "u")
    assert code == 0, err
    code, err = run_main(
        capsys, "eval", "--model", inputs["model"], "--data", forget, *EVAL, "--out", tmp_path / "e"
    )
    assert code == 0, err
    assert time.perf_counter() - start < 120
    generations = json.loads((tmp_path / "e" / "generations.json").read_text())
    assert len(generations["forget"]) == len(FORGET)


# ---- failures after the lock: the folder is left as it was found -------------------------------------------


def test_a_run_failing_midway_leaves_the_out_folder_as_found(
    inputs, tmp_path, capsys, untouched, reference_backend
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("kept")
    # eval: the prompts fill --max-length 3, found while evaluating (under the lock).
    argv = ["eval", "--model", inputs["model"], "--data", inputs["forget"], *EVAL, "--max-length", "3"]
    code, err = run_main(capsys, *argv, "--out", out)
    assert code == 2 and "row 0: the prompt fills max_length=3 tokens" in error_line(err, "eval")
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    code, err = run_main(capsys, *argv, "--out", tmp_path / "new")
    assert code == 2 and not (tmp_path / "new").exists()  # a folder the run created is removed
    # unlearn: NaN at the first step, before any checkpoint: nothing a resume could use, nothing left.
    model, tokenizer, forget, retain = _from_files(inputs)
    with pytest.raises(ValueError, match="optimizer step 1"):
        unlearn(model, tokenizer, forget, retain, UnlearnConfig(**FAST), str(out), callbacks=[PoisonAt(1)])
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]


def test_non_finite_metrics_are_null_in_valid_json(tmp_path, caplog):
    from asu.metrics.report import write_results

    nan = float("nan")
    result = {
        "benchmark": "TOFU",
        "logs": {"forget_Q_A_Prob": {"agg_value": nan, "value_by_index": {"0": {"prob": nan}}}},
        "headline": {"forget_Q_A_Prob": nan},
        "extras": {},
        "summary": {"forget_Q_A_Prob": nan, "retain_Q_A_ROUGE": 0.5},
        "generations": {},
        "notes": [],
    }
    with caplog.at_level("WARNING"):
        write_results(result, tmp_path)
    for name in ("TOFU_EVAL.json", "TOFU_SUMMARY.json", "summary.json"):
        text = (tmp_path / name).read_text()
        assert "NaN" not in text and json.loads(text) is not None
    assert json.loads((tmp_path / "summary.json").read_text()) == {
        "forget_Q_A_Prob": None,
        "retain_Q_A_ROUGE": 0.5,
    }
    assert "non-finite value(s) written as null" in caplog.text


def test_a_damaged_checkpoint_is_named_on_resume(inputs, interrupted, capsys):
    weights = interrupted / "checkpoints" / "checkpoint-2" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    argv = ["unlearn", "--model", inputs["model"], "--forget", inputs["forget"], "--retain", inputs["retain"]]
    code, err = run_main(
        capsys, *argv, *TRAIN, "--lr", "1e-3", "--save-steps", "2", "--out", interrupted, "--resume"
    )
    assert code == 2
    assert f"{weights}: unreadable checkpoint weights" in error_line(err, "unlearn")
