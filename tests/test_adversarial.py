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
row, encoding errors and unpaired surrogates, Ctrl-C, and what a killed run leaves behind. Then: broken
--template files in every command; hub names with no hub (a refused endpoint) and mistyped local model
folders; asu continual killed at any point (SIGKILL in its first step, Ctrl-C after a checkpoint and between a
step's model and its evaluation), edited between runs (a request, the retain set, the template, the
settings, a removed step), resumed into nothing, and a second run into its busy --out; finished results of
eval / inspect / unlearn / continual refused without --overwrite (and across commands), --overwrite that
completes, fails while computing or writing, or is killed mid-write, and a hand-made result manifest.
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


# ---- prompt template files: every way one can be broken is named, in every command ------------------------

TEMPLATE_FILES = {
    "syntax error": (b"{% for m in messages %}{{ m.content }\n{% endfor %}", "line 1: Jinja syntax error"),
    "undefined method": (
        b"{% for m in messages %}{{ m.role }}: {{ m.content.frobnicate() }}\n{% endfor %}",
        "has no attribute 'frobnicate' (a name or method the template uses does not exist)",
    ),
    "raise_exception": (
        b"{{ raise_exception('this template takes no user role') }}",
        "the template stopped with raise_exception: this template takes no user role",
    ),
    "not UTF-8": (b"\xff\xfe{% for m in messages %}{{ m.content }}{% endfor %}", "not UTF-8 text (byte 0xff"),
    "empty": (b"", "is empty"),
    "printed name nobody gives": (
        b"{{ bos }}{% for m in messages %}{{ m.content }}{% endfor %}",
        "'bos' is undefined",
    ),
    "no assistant answer": (
        b'{% for m in messages %}{% if m.role == "user" %}Q: {{ m.content }}\n{% endif %}{% endfor %}'
        b"{% if add_generation_prompt %}A:{% endif %}",
        "generation prompt is not the start of the rendered conversation",
    ),
}


def _command_argv(command: str, inputs: dict[str, Path], out: Path) -> list:
    """The quickest valid argv of each command that writes a result into ``out``."""
    m, f, r = inputs["model"], inputs["forget"], inputs["retain"]
    return {
        "unlearn": ["unlearn", "--model", m, "--forget", f, "--retain", r, *TRAIN, "--out", out],
        "eval": ["eval", "--model", m, "--data", f, "--retain", r, *EVAL, "--out", out],
        "inspect": ["inspect", "--model", m, "--data", f, "--max-length", "48", "--out", out],
        "continual": ["continual", "--model", m, "--forget", f, "--forget", r, "--retain", r, *TRAIN,
                      "--no-eval", "--out", out],
    }[command]  # fmt: skip


@pytest.mark.parametrize("command", ["unlearn", "eval", "inspect", "continual"])
@pytest.mark.parametrize("kind", list(TEMPLATE_FILES))
def test_a_broken_template_file_is_named_before_anything_is_written(
    kind, command, inputs, tmp_path, capsys, untouched
):
    """A broken --template file ended in the catch-all "unexpected ..." line (exit 1) naming neither the file
    nor the problem."""
    content, message = TEMPLATE_FILES[kind]
    template = tmp_path / "chat.jinja"
    template.write_bytes(content)
    code, err = run_main(capsys, *_command_argv(command, inputs, tmp_path / "out"), "--template", template)
    assert code == 2, err
    line = error_line(err, command)
    assert f"template file {template}" in line and message in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jinja"]


def test_a_mistyped_template_file_or_name_says_what_was_meant(inputs, tmp_path, capsys):
    (tmp_path / "chat.jinja").write_text("{% for m in messages %}{{ m.content }}\n{% endfor %}")
    argv = _command_argv("unlearn", inputs, tmp_path / "out")
    code, err = run_main(capsys, *argv, "--template", tmp_path / "chta.jinja")
    assert code == 2 and f"(did you mean {tmp_path / 'chat.jinja'}?)" in error_line(err, "unlearn")
    code, err = run_main(capsys, *argv, "--template", "lama3")
    assert code == 2 and "(did you mean llama3?)" in error_line(err, "unlearn")
    assert not (tmp_path / "out").exists()


# ---- hub names with no hub: one line at once, naming the name; a mistyped local folder is named ----------


@pytest.fixture
def no_hub(monkeypatch):
    """A hub endpoint that refuses connections (nothing listens on port 9 of this machine), checked afresh;
    the offline switch the check flips is restored after the test."""
    pytest.importorskip("datasets")
    from huggingface_hub import constants

    import asu.sources

    monkeypatch.setattr(asu.sources, "_HUB_STATE", {})
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    if "datasets.config" in sys.modules:
        monkeypatch.setattr(
            sys.modules["datasets.config"], "HF_HUB_OFFLINE", sys.modules["datasets.config"].HF_HUB_OFFLINE
        )


def _offline_cases(inputs: dict[str, Path], out: Path) -> dict[str, tuple[list, str]]:
    """name -> (argv, the hub name the error must name)."""
    m, f, r = inputs["model"], inputs["forget"], inputs["retain"]
    hub_model = "asu-test-org/no-such-model"
    return {
        "unlearn --forget NAME:CONFIG": (
            ["unlearn", "--model", m, "--forget", "asu-test-org/none:forget10", "--retain", r, *TRAIN],
            "asu-test-org/none",
        ),
        "unlearn --retain NAME:CONFIG": (
            ["unlearn", "--model", m, "--forget", f, "--retain", "asu-test-org/none:retain90", *TRAIN],
            "retain90",
        ),
        "eval --split forget10": (["eval", "--model", m, "--split", "forget10", *EVAL], "locuslab/TOFU"),
        "inspect --data NAME:CONFIG": (
            ["inspect", "--model", m, "--data", "asu-test-org/none:forget05"],
            "forget05",
        ),
        "continual hub request": (
            [
                "continual",
                "--model",
                m,
                "--forget",
                f,
                "--forget",
                "asu-test-org/none:forget01",
                "--retain",
                r,
                *TRAIN,
            ],
            "asu-test-org/none:forget01",
        ),
        "unlearn --model org/name": (
            ["unlearn", "--model", hub_model, "--forget", f, "--retain", r, *TRAIN],
            hub_model,
        ),
        "eval --model org/name": (["eval", "--model", hub_model, "--data", f, *EVAL], hub_model),
        "inspect --model org/name": (["inspect", "--model", hub_model, "--data", f], hub_model),
        "continual --model org/name": (
            ["continual", "--model", hub_model, "--forget", f, "--forget", r, *TRAIN, "--no-eval"],
            hub_model,
        ),
    }


OFFLINE_CASES = list(_offline_cases({k: Path("x") for k in ("model", "forget", "retain")}, Path("x")))


@pytest.mark.parametrize("name", OFFLINE_CASES)
def test_a_hub_name_with_no_hub_fails_at_once_naming_it(name, inputs, tmp_path, capsys, no_hub, untouched):
    """These failed correctly but only after ~27 s of the hub client's retries: the hub is now probed once
    (a refused connection answers at once) and its clients switched to offline mode, so nothing retries."""
    argv, named = _offline_cases(inputs, tmp_path / "out")[name]
    command = argv[0]
    code, err = run_main(capsys, *argv, "--out", tmp_path / "out")
    assert code == 2, err
    line = error_line(err, command)
    assert named in line and "hub is unreachable (http://127.0.0.1:9" in line, line
    assert not (tmp_path / "out").exists()


def test_the_hub_probe_answers_within_its_timeout():
    """A network that swallows packets (no refusal, no answer) costs the probe's timeout, not the clients'
    retries; a listening endpoint counts as reachable."""
    import socket

    from asu.sources import _connects

    start = time.monotonic()
    _connects("10.255.255.1", 80, 0.5)  # unroutable: times out (or is refused at once)
    assert time.monotonic() - start < 5
    with socket.create_server(("127.0.0.1", 0)) as server:
        assert _connects("127.0.0.1", server.getsockname()[1], 5) is None
    assert _connects("127.0.0.1", 9, 1) is not None


@pytest.mark.parametrize("command", ["unlearn", "eval", "inspect", "continual"])
def test_a_mistyped_local_model_folder_is_named_not_taken_for_a_hub_id(command, inputs, tmp_path, capsys):
    """``runs/modle`` (with a ``runs`` folder) was read as a hub id: the error named neither."""
    runs = tmp_path / "runs"
    shutil.copytree(inputs["model"], runs / "model")
    argv = _command_argv(command, inputs, tmp_path / "out")
    argv[argv.index("--model") + 1] = "runs/modle"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        code, err = run_main(capsys, *argv)
    finally:
        os.chdir(cwd)
    assert code == 2, err
    assert "model folder runs/modle does not exist (did you mean runs/model?)" in error_line(err, command)
    assert not (tmp_path / "out").exists()


# ---- asu continual: a kill at any point resumes; an edit between runs is refused; --out is locked --------

#: continual's quick flags: two requests (the forget rows, then the retain file's rows) and a retain set.
CONTINUAL = [*TRAIN, "--batch-size", "1", "--save-steps", "1000"]


def _continual_argv(inputs: dict[str, Path], out: Path, *extra: object, second: Path | None = None) -> list:
    m, f, r = inputs["model"], inputs["forget"], inputs["retain"]
    return ["continual", "--model", m, "--forget", f, "--forget", second or r, "--retain", r, *CONTINUAL,
            *extra, "--out", out]  # fmt: skip


def test_continual_killed_in_its_first_step_resumes(inputs, tmp_path, capsys, untouched, reference_backend):
    """SIGKILL while step 1 trains, before its first checkpoint: "nothing to resume: DIR holds no
    continual.json", and a plain rerun said the folder was not empty: the run could not be continued."""
    out = tmp_path / "out"
    argv = _continual_argv(inputs, out, "--no-eval", "--epochs", "4")
    first = asu_process(*argv, wait=False)
    started = out / "step-1" / "checkpoints" / "unlearn_config.json"
    try:
        end = time.monotonic() + 300
        while not started.exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < end, "step 1 never started"
            time.sleep(0.02)
        first.kill()
        first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert not (out / "step-1" / "run.json").exists()  # killed in step 1
    assert json.loads((out / "continual.json").read_text())["steps"] == []
    code, err = run_main(capsys, *argv)
    assert code == 2 and "already holds a continual run (continual.json); resume it" in error_line(
        err, "continual"
    )
    code, err = run_main(capsys, *argv, "--resume")
    assert code == 0, err
    summary = json.loads((out / "continual.json").read_text())
    assert [s["step"] for s in summary["steps"]] == [1, 2]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_continual_stopped_after_a_checkpoint_or_before_its_evaluation_resumes(
    inputs, tmp_path, capsys, monkeypatch, untouched, reference_backend
):
    """Stopped in step 1 after a checkpoint (the step resumes from it), then between step 1's model and its
    evaluation (the step is loaded and evaluated, not retrained); the run holds --out's lock throughout."""
    import asu.commands.continual as continual_command
    import asu.continual

    out = tmp_path / "out"
    argv = _continual_argv(inputs, out, "--eval-max-new-tokens", "4", "--save-steps", "2")
    real_unlearn = asu.continual.unlearn
    resumes = []

    def unlearn_stopped_at_step_2(*args, **kwargs):
        resumes.append(kwargs["resume"])
        if len(resumes) == 1:
            kwargs["callbacks"] = [StopAt(3)]  # step 1, after checkpoint-2
        return real_unlearn(*args, **kwargs)

    monkeypatch.setattr(asu.continual, "unlearn", unlearn_stopped_at_step_2)
    code, err = run_main(capsys, *argv)
    assert code == 130, err
    assert complete_checkpoints(str(out / "step-1" / "checkpoints")) == ["checkpoint-2"]

    real_evaluator = continual_command.step_evaluator
    evaluated = []

    def evaluator(*args, **kwargs):
        evaluate = real_evaluator(*args, **kwargs)

        def stop_once(model, k):
            assert (out / LOCK_FILE).read_text().strip() == str(os.getpid())  # --out is locked by the run
            evaluated.append(k)
            if evaluated == [1]:
                raise KeyboardInterrupt
            return evaluate(model, k)

        return stop_once

    monkeypatch.setattr(continual_command, "step_evaluator", evaluator)
    code, err = run_main(capsys, *argv, "--resume")
    assert code == 130 and resumes == [False, True], err  # step 1 continued from its checkpoint
    assert (out / "step-1" / "run.json").is_file() and not (out / "step-1" / "eval.json").exists()
    code, err = run_main(capsys, *argv, "--resume")
    assert code == 0, err
    # step 1 was loaded and evaluated, not retrained; step 2 trained afresh
    assert resumes == [False, True, False] and evaluated == [1, 1, 2]
    summary = json.loads((out / "continual.json").read_text())
    assert [s["step"] for s in summary["steps"]] == [1, 2] and summary["steps"][0]["evaluation"]
    assert (out / "step-1" / "eval.json").is_file() and not (out / LOCK_FILE).exists()


@pytest.fixture(scope="module")
def continual_run(inputs, tmp_path_factory) -> Path:
    """A folder holding a finished two-step continual run ``run`` (no evaluation) of the files beside it:
    ``forget.jsonl``, ``second.jsonl`` (the requests), ``retain.jsonl`` and the template ``chat.jinja``, all
    named relative to the folder (a copy of it resumes with the same settings)."""
    root = tmp_path_factory.mktemp("continual")
    shutil.copy(inputs["forget"], root / "forget.jsonl")
    shutil.copy(inputs["retain"], root / "retain.jsonl")
    shutil.copy(inputs["retain"], root / "second.jsonl")
    (root / "chat.jinja").write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                                     "{% if add_generation_prompt %}assistant:{% endif %}")  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "asu.commands", *map(str, _resume_argv(inputs["model"]))],
                          env=ENV, cwd=root, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return root


def _resume_argv(model: Path, out: object = "run", *, second: str = "second.jsonl") -> list:
    """``asu continual`` of :func:`continual_run`'s files (relative to the current folder) into ``out``."""
    files = {"model": model, "forget": Path("forget.jsonl"), "retain": Path("retain.jsonl")}
    return _continual_argv(files, out, "--no-eval", "--template", "chat.jinja", second=second)


@pytest.fixture
def continual_copy(continual_run, tmp_path, monkeypatch) -> Path:
    """A copy of :func:`continual_run`'s folder, made the current folder."""
    here = Path(shutil.copytree(continual_run, tmp_path / "here"))
    monkeypatch.chdir(here)
    return here


def _edit(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["answer"] += " (corrected)"
    _jsonl(path, rows)


EDITS = {
    # what is changed between the runs -> a piece of the refusal
    "a request file": ("second.jsonl", "forget request 2 (second.jsonl) changed since the run was started"),
    "the retain file": ("retain.jsonl", "retain rows changed"),
    "the template file": ("chat.jinja", "prompt template changed"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_continual_resume_after_an_edit_between_runs_is_refused(
    edit, inputs, continual_copy, capsys, reference_backend
):
    """--resume after a request file was edited exited 0 and kept the step trained on the old rows (only the
    requests' sizes were recorded)."""
    name, message = EDITS[edit]
    if name.endswith(".jinja"):
        (continual_copy / name).write_text("### a chat\n" + (continual_copy / name).read_text())
    else:
        _edit(continual_copy / name)
    before = tree_digest(continual_copy / "run")
    code, err = run_main(capsys, *_resume_argv(inputs["model"]), "--resume")
    assert code == 2, err
    line = error_line(err, "continual")
    assert "cannot resume with different data" in line and message in line, line
    assert tree_digest(continual_copy / "run") == before


def test_continual_resume_and_rerun_rules(inputs, continual_copy, capsys, reference_backend):
    """A finished run resumes to itself and is never overwritten; --resume of nothing is refused (it used to
    start a fresh run with exit 0); other settings or another number of requests are refused."""
    run, argv = continual_copy / "run", _resume_argv(inputs["model"])
    before = tree_digest(run)
    code, err = run_main(capsys, *argv)
    assert code == 2 and "already holds a continual run" in error_line(err, "continual")
    code, err = run_main(capsys, *argv, "--lr", "1e-2", "--resume")
    assert code == 2 and "different settings: config.lr changed" in error_line(err, "continual")
    at = argv.index("second.jsonl")
    fewer = argv[: at - 1] + argv[at + 1 :]  # without "--forget second.jsonl"
    code, err = run_main(capsys, *fewer, "--resume")
    line = error_line(err, "continual")
    assert code == 2 and "cannot resume with 1 forget requests: the run was started with 2" in line, line
    steps = {k: tree_digest(run / f"step-{k}") for k in (1, 2)}
    assert tree_digest(run) == before
    capsys.readouterr()
    code = main([str(a) for a in (*argv, "--resume")])
    assert code == 0 and capsys.readouterr().out.count("(already done)") == 2
    assert {k: tree_digest(run / f"step-{k}") for k in (1, 2)} == steps  # loaded, not redone
    Path("empty").mkdir()
    for missing in ("nope", "empty"):
        code, err = run_main(capsys, *_resume_argv(inputs["model"], missing), "--resume")
        assert code == 2 and f"nothing to resume: --out {missing}" in error_line(err, "continual")
    assert not Path("nope").exists() and list(Path("empty").iterdir()) == []


#: A process holding an output folder's lock as a run does, until its stdin closes.
HOLD_LOCK = (
    "import sys; from asu.files import output_lock; lock = output_lock(sys.argv[1]); lock.__enter__(); "
    "print('held', flush=True); sys.stdin.read()"
)


def test_a_second_run_into_a_busy_continual_out_names_the_holder(inputs, continual_copy, capsys):
    """Only each step-K was locked, not --out: a second continual was refused without naming the run (and,
    with the first run's continual.json there, was told to resume it)."""
    out = continual_copy / "run"
    before = tree_digest(out)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=ENV,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        for extra in ([], ["--resume"]):
            code, err = run_main(capsys, *_resume_argv(inputs["model"]), *extra)
            line = error_line(err, "continual")
            assert code == 2 and f"is in use by another asu run (pid {holder.pid})" in line, line
        for command in ("unlearn", "eval", "inspect"):
            code, err = run_main(capsys, *_command_argv(command, inputs, out))
            assert code == 2 and f"(pid {holder.pid})" in error_line(err, command)
    finally:
        holder.communicate("", timeout=60)
    assert tree_digest(out) == before


def test_continual_resume_refuses_a_finished_step_removed_by_hand(inputs, continual_copy, capsys):
    """Retraining a removed step 1 would leave step 2 trained from another model than the new step 1."""
    shutil.rmtree(continual_copy / "run" / "step-1")
    code, err = run_main(capsys, *_resume_argv(inputs["model"]), "--resume")
    assert code == 2, err
    assert "records step 1 as finished but run/step-1 no longer holds" in error_line(err, "continual")
    assert not (continual_copy / "run" / "step-1").exists()


# ---- finished results: refused unless --overwrite, and replaced as one transaction -----------------------


@pytest.fixture(scope="module")
def finished(inputs, tmp_path_factory) -> dict[str, Path]:
    """A finished ``asu eval`` result (with a τ preview) and a finished ``asu inspect`` result."""
    root = tmp_path_factory.mktemp("finished")
    m, f, r = inputs["model"], inputs["forget"], inputs["retain"]
    env = {**ENV, "ASU_KERNELS_BACKEND": "reference"}
    for argv in (
        [
            "eval",
            "--model",
            m,
            "--data",
            f,
            "--retain",
            r,
            *EVAL,
            "--temperature",
            "2",
            "--out",
            root / "eval",
        ],
        ["inspect", "--model", m, "--data", f, "--max-length", "48", "--out", root / "inspect"],
    ):
        done = subprocess.run([sys.executable, "-m", "asu.commands", *map(str, argv)], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr
    return {"eval": root / "eval", "inspect": root / "inspect"}


def _copy_of(finished: dict[str, Path], command: str, tmp_path: Path) -> tuple[Path, str]:
    out = Path(shutil.copytree(finished[command], tmp_path / command))
    return out, tree_digest(out)


@pytest.mark.parametrize("command", ["eval", "inspect"])
def test_a_second_run_into_a_finished_result_is_refused_without_overwrite(
    command, finished, inputs, tmp_path, capsys, untouched
):
    """A second asu eval replaced TOFU_EVAL.json, summary.json...; a second inspect replaced inspect.json and
    its heatmaps."""
    out, before = _copy_of(finished, command, tmp_path)
    manifest = json.loads((out / "asu-result.json").read_text())
    assert manifest["command"] == command and manifest["entries"]
    code, err = run_main(capsys, *_command_argv(command, inputs, out))
    assert code == 2, err
    line = error_line(err, command)
    assert f"--out {out} already holds a finished asu {command} result (asu-result.json" in line
    assert "pass --overwrite to replace it" in line
    assert tree_digest(out) == before


@pytest.mark.parametrize(
    ("command", "holder"),
    [("eval", "inspect"), ("inspect", "eval"), ("unlearn", "eval"), ("continual", "inspect")],
)
def test_no_command_writes_over_another_commands_result_even_with_overwrite(
    command, holder, finished, inputs, tmp_path, capsys
):
    out, before = _copy_of(finished, holder, tmp_path)
    extra = ["--overwrite"] if command in ("eval", "inspect") else []
    code, err = run_main(capsys, *_command_argv(command, inputs, out), *extra)
    assert code == 2, err
    assert f"already holds a finished asu {holder} result" in error_line(err, command)
    assert "never writes over another command's result" in error_line(err, command)
    assert tree_digest(out) == before


def test_eval_and_inspect_refuse_an_unlearn_or_continual_run(continual_run, inputs, tmp_path, capsys):
    run, step = continual_run / "run", continual_run / "run" / "step-1"
    before = tree_digest(run)
    for command in ("eval", "inspect"):
        for out, what in ((run, "an asu continual run"), (step, "a finished asu unlearn run")):
            code, err = run_main(capsys, *_command_argv(command, inputs, out), "--overwrite")
            assert code == 2 and f"already holds {what}" in error_line(err, command)
    assert tree_digest(run) == before


def test_overwrite_replaces_the_whole_result(
    finished, inputs, tmp_path, capsys, untouched, reference_backend
):
    """The new result replaces the old one entirely: a file only the old run wrote (its τ preview) goes; the
    user's own file stays."""
    out, _ = _copy_of(finished, "eval", tmp_path)
    (out / "notes.md").write_text("mine")
    assert (out / "tau_preview.json").is_file()
    code, err = run_main(capsys, *_command_argv("eval", inputs, out), "--overwrite")
    assert code == 0, err
    manifest = json.loads((out / "asu-result.json").read_text())
    assert "tau_preview.json" not in manifest["entries"] and not (out / "tau_preview.json").exists()
    assert {"TOFU_EVAL.json", "summary.json", "eval_config.json"} <= set(manifest["entries"])
    assert (out / "notes.md").read_text() == "mine" and "notes.md" not in manifest["entries"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("when", ["while evaluating", "while writing"])
def test_overwrite_that_fails_keeps_the_old_result(
    when, finished, inputs, tmp_path, capsys, monkeypatch, untouched
):
    import asu.commands.eval as eval_command

    out, before = _copy_of(finished, "eval", tmp_path)
    old_files = {p.name: p.read_bytes() for p in out.iterdir()}
    seen = []

    def broken_run(*args, **kwargs):
        # While the new run computes, the old result is in place, unchanged (beside the run's lock).
        seen.append({p.name: p.read_bytes() for p in out.iterdir() if p.name != LOCK_FILE})
        raise RuntimeError("the machine fell over")

    def broken_write(result, folder, *args, **kwargs):
        (Path(folder) / "TOFU_EVAL.json").write_text("{half")
        (Path(folder) / "new-file.json").write_text("{}")
        raise OSError(28, "No space left on device")

    if when == "while evaluating":
        monkeypatch.setattr(eval_command, "_run_tofu", broken_run)
    else:
        monkeypatch.setattr(eval_command, "write_results", broken_write)
    code, err = run_main(capsys, *_command_argv("eval", inputs, out), "--overwrite")
    assert code in (1, 2) and err, err
    assert seen == ([old_files] if when == "while evaluating" else [])
    assert tree_digest(out) == before


def test_overwrite_killed_while_writing_is_rolled_back_by_the_next_run(finished, inputs, tmp_path, capsys):
    """A run killed inside its transaction leaves the old result in its journal; the next run into the folder
    (of any command) restores it before anything else."""
    from asu.files import check_finished_result, output_lock, result_transaction

    out, before = _copy_of(finished, "eval", tmp_path)
    with output_lock(out):
        transaction = result_transaction(out, "eval", check_finished_result(out, "eval", overwrite=True))
        transaction.__enter__()  # never left: what SIGKILL leaves
        (out / "TOFU_EVAL.json").write_text("{half")
        (out / "summary.json").write_text("{}")
    assert not (out / "asu-result.json").exists()
    code, err = run_main(capsys, *_command_argv("inspect", inputs, out), "--overwrite")
    lines = [line for line in err.splitlines() if line.startswith("asu ")]
    assert code == 2 and "Traceback" not in err and len(lines) >= 2, err
    assert all(line.endswith("left by an interrupted run") for line in lines[:-1])
    assert "already holds a finished asu eval result" in lines[-1]
    assert tree_digest(out) == before
    del transaction


@pytest.mark.parametrize(
    ("manifest", "why"),
    [
        (
            '{"command": "eval", "entries": ["../victim.txt"]}',
            "an entry that is not a file name in its folder",
        ),
        ('{"command": "eval", "entries": ["VICTIM"]}', "an entry that is not a file name in its folder"),
        ('{"command": "eval", "entries": [', "not valid JSON"),
        ('{"entries": []}', "no command"),
    ],
)
def test_a_hand_made_result_manifest_is_never_followed(manifest, why, inputs, tmp_path, capsys, untouched):
    """--overwrite moves the entries a manifest lists aside and deletes them: one naming a file outside the
    folder (or an absolute path) would delete the user's file."""
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's")
    out = tmp_path / "out"
    out.mkdir()
    (out / "asu-result.json").write_text(manifest.replace("VICTIM", str(victim)))
    code, err = run_main(capsys, *_command_argv("eval", inputs, out), "--overwrite")
    assert code == 2, err
    line = error_line(err, "eval")
    assert f"{out / 'asu-result.json'}: not a result manifest written by asu" in line and why in line, line
    assert victim.read_text() == "the user's"
    assert sorted(p.name for p in out.iterdir()) == ["asu-result.json"]
