"""Synthesis jobs that hold up against the faults users hit (issue 9 findings 3, 4 and the job parts of 8), run on
several processes (issue 10) and evaluate themselves (issue 12).  Each `finding` test failed on the code before
these changes.  Real parts throughout: the fixture model, the real codec sidecar with a seeded RANDOM EnCodec
(asked for explicitly: no weights can be downloaded here), real espeak-ng prompts, real processes killed with
real signals, the real evaluation models."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, cli_env, fixture_paths, free_port, heads_of
from valle_jax import jobfolder

CKPT = fixture_paths("llama_v5_split_sums_nonunified")[0]
COMMON = ["--random-codec", "0", "--codec", "encodec", "--max-ar-steps", "12", "--batch", "4", "--chunk", "4",
          "--heads", str(heads_of(CKPT)), "--quiet"]  # fmt: skip
TIMEOUT = 600


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Subprocess environment: one CPU device, compiled programs cached across the module's jobs."""
    return cli_env(tmp_path_factory)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    d = tmp_path_factory.mktemp("prompts")
    for i, voice in enumerate(["en-us+m3", "en-us+f2"]):
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(d / f"ref{i}.wav"), "A voice prompt for the job."], check=True)
    return d


def _synthesize(args, env, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "valle_jax.synthesize", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=TIMEOUT, **kw)  # fmt: skip


def _summary(r: subprocess.CompletedProcess) -> dict:
    return json.loads(r.stdout.strip().splitlines()[-1])


def _results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, one stderr line starting with 'error:' holding every needle, no traceback."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING: using a RANDOM")]
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _good(i: int, prompts: Path, **extra) -> dict:
    return {"id": f"good{i}", "text": f"Sentence number {i}.", "prompt": str(prompts / f"ref{i % 2}.wav"), **extra}


# ----------------------------------------------------------------------------- 3: every field checked


# (raw JSON of the bad fields, what the error must say); each merged into an otherwise good item
BAD_FIELDS = {
    "steps_abc": ('"max_ar_steps": "abc"', "'max_ar_steps' = \"abc\": expected an integer from 1 to 12"),
    "steps_null": ('"max_ar_steps": null', "'max_ar_steps' = null: expected an integer"),
    "steps_huge": ('"max_ar_steps": 1e400', "'max_ar_steps' = Infinity: expected an integer"),
    "steps_zero": ('"max_ar_steps": 0', "'max_ar_steps' = 0: expected an integer from 1"),
    "steps_neg": ('"max_ar_steps": -5', "'max_ar_steps' = -5: expected an integer from 1"),
    "steps_float": ('"max_ar_steps": 2.5', "'max_ar_steps' = 2.5: expected an integer"),
    "steps_over": ('"max_ar_steps": 13', "'max_ar_steps' = 13: expected an integer from 1 to 12"),
    "prompt_num": ('"prompt": 42', "'prompt' = 42: expected a path or a non-empty list of paths"),
    "prompt_list": ('"prompt": [42]', "'prompt' = [42]: expected a path"),
    "prompt_empty": ('"prompt": []', "'prompt' = []: expected a path"),
    "codes_num": ('"codes": 42', "'codes' = 42: expected the path of a .enc/.dac codes file"),
    "text_num": ('"text": 42', "'text' = 42: expected a string"),
    "text_null": ('"text": null', "'text' = null: expected a string"),
    "language_num": ('"language": 7', "'language' = 7: expected a language code"),
    "temp_str": ('"ar_temperature": "hot"', "'ar_temperature' = \"hot\": expected a finite number"),
    "temp_nan": ('"nar_temperature": NaN', "'nar_temperature' = NaN: expected a finite number"),
    "topk_float": ('"top_k": 2.5', "'top_k' = 2.5: expected an integer"),
    "topk_bool": ('"top_k": true', "'top_k' = true: expected an integer"),
    "reppen_zero": ('"repetition_penalty": 0', "'repetition_penalty' = 0: expected a number > 0"),
    "dry_len_neg": ('"dry_allowed_length": -1', "'dry_allowed_length' = -1: expected an integer >= 0"),
}


def _bad_line(name: str, fields: str, prompts: Path) -> str:
    base = {"id": f"bad_{name}", "text": "Some text.", "prompt": str(prompts / "ref0.wav")}
    for key in ("max_ar_steps", "prompt", "codes", "text", "language"):
        if f'"{key}"' in fields:
            base.pop(key, None)
    return json.dumps(base)[:-1] + ", " + fields + "}"


def test_finding3_every_field_of_a_request_is_checked(prompts):
    """The library path: Synthesizer.request refuses each bad field with an ItemError naming field and value."""
    from valle_jax.pipeline import ItemError, Settings, Synthesizer, load_models

    syn = Synthesizer(load_models(CKPT, heads=heads_of(CKPT)), Settings(max_ar_steps=12))  # no codec: codes only
    for name, (fields, expected) in BAD_FIELDS.items():
        item = json.loads(_bad_line(name, fields, prompts))
        with pytest.raises(ItemError) as e:
            syn.request(item["id"], item)
        assert expected in str(e.value), (name, str(e.value))
    for item, expected in [({"text": "x"}, "no prompt: give 'prompt'"), ({"id": 42, "text": "x", "codes": "a.enc"}, "'id' = 42"),
                           ({"text": "x", "codes": "a.enc", "temprature": 1}, "unknown field(s) ['temprature']")]:  # fmt: skip
        with pytest.raises(ItemError, match=None) as e:
            syn.request("u", item)
        assert expected in str(e.value), (item, str(e.value))


def test_finding3_a_good_codes_item_keeps_its_settings(tmp_path):
    from valle_jax.codec import write_codes
    from valle_jax.pipeline import Settings, Synthesizer, load_models

    models = load_models(CKPT, heads=heads_of(CKPT))
    codes = np.arange(40 * 8, dtype=np.int64).reshape(40, 8) % 1024
    write_codes(tmp_path / "p.enc", codes)
    syn = Synthesizer(models, Settings(max_ar_steps=12, prompt_seconds=0))
    req = syn.request("u", {"text": "Hi.\nAgain.", "codes": str(tmp_path / "p.enc"), "max_ar_steps": 5, "top_k": 3,
                            "ar_temperature": 0, "nar_temperature": 0.5, "language": "en"})  # fmt: skip
    assert req.max_tokens == 5 and len(req.lines) == 2
    assert req.ar == {"top_k": 3, "temperature": 0} and req.nar == {"top_k": 3, "temperature": 0.5}
    assert req.prom.shape == (40, models.nar_cfg.resp_levels) and (req.prom == codes[:, : req.prom.shape[1]]).all()


def test_bad_sampler_flags_are_usage_errors():
    from valle_jax.synthesize import UsageError, build_parser, settings_from_args

    for flag, value, needle in [("--top-k", "2.5", "expected an integer"), ("--repetition-penalty", "0", "> 0"),
                                ("--ar-temperature", "nan", "expected a finite number"), ("--batch", "0", "slots = 0")]:  # fmt: skip
        args = build_parser().parse_args(["--checkpoint", "c", "--manifest", "m", "--out", "o", flag, value])
        with pytest.raises(UsageError) as e:
            settings_from_args(args)
        assert needle in str(e.value) and (flag in str(e.value) or flag == "--batch"), str(e.value)
    args = build_parser().parse_args(["--checkpoint", "c", "--manifest", "m", "--out", "o", "--top-k", "3", "--nar-temperature", "0.5"])
    assert settings_from_args(args).ar == {"top_k": 3} and settings_from_args(args).nar == {"top_k": 3, "temperature": 0.5}


def test_errors_are_classed_transient_only_when_a_retry_may_pass():
    import jax

    from valle_jax.codec import CodecCrashError, CodecError, CodecTimeoutError
    from valle_jax.pipeline import PERMANENT, TRANSIENT, ItemError, error_kind

    transient = [CodecCrashError("the codec sidecar (pid 7) died during the decode request (killed by SIGKILL)."),
                 CodecTimeoutError("the codec sidecar (pid 7) gave no answer to the decode request within 600 s"),
                 CodecError("the codec sidecar (encodec) failed on decode: OutOfMemoryError: CUDA out of memory."),
                 jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 3.9GiB."),
                 MemoryError()]  # fmt: skip
    permanent = [ItemError("field 'text' = 42: expected a string"), ValueError("bad"),
                 CodecError("the codec sidecar (encodec) failed on encode: RuntimeError: input has 0 samples")]  # fmt: skip
    assert [error_kind(e) for e in transient] == [TRANSIENT] * len(transient)
    assert [error_kind(e) for e in permanent] == [PERMANENT] * len(permanent)


# ----------------------------------------------------------------------------- the job folder, alone


def test_results_fold_to_one_line_per_id_and_ignore_torn_lines(tmp_path):
    out = tmp_path
    (out / "a.wav").write_bytes(b"x")
    (out / "b.wav").write_bytes(b"x")
    (out / "results.jsonl").write_text(
        '{"id": "b", "status": "error", "error": "codec died", "kind": "transient"}\n'
        '{"id": "a", "status": "ok", "seconds": 1.0}\n'
        '{"id": "c", "status": "error", "error": "bad", "kind": "permanent"}\n'
        '{"id": "d", "sta')  # a torn last line (kill mid-write)
    (out / "results.p1.jsonl").write_text('{"id": "b", "status": "ok", "seconds": 2.0}\n')
    (out / "results.p0.jsonl").write_text('{"id": "e", "status": "error", "error": "oom", "kind": "transient"}\n')
    state = jobfolder.compact(out, ["a", "b", "c", "d", "e"])
    lines = _results(out)
    assert [r["id"] for r in lines] == ["a", "b", "c", "e"] and lines[1]["status"] == "ok"
    assert state == {r["id"]: r for r in lines}
    assert jobfolder.part_files(out) == []
    assert jobfolder.tally(state, ["a", "b", "c", "d", "e"], out) == {"ok": 2, "error": 1, "transient": 1, "pending": 1}
    assert [i for i in "abcde" if not jobfolder.is_done(state.get(i), out)] == ["d", "e"]
    assert [i for i in "abcde" if not jobfolder.is_done(state.get(i), out, retry_errors=True)] == ["c", "d", "e"]
    (out / "a.wav").unlink()  # an ok id whose wav is gone is done again
    assert not jobfolder.is_done(state["a"], out)


def test_lock_names_its_holder_and_is_taken_over_from_a_dead_one(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; from valle_jax import jobfolder;"
                               "lock = jobfolder.acquire(Path(sys.argv[1])); print('held', flush=True); time.sleep(600)",
                               str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(jobfolder.JobLockedError) as e:
            jobfolder.acquire(tmp_path)
        info = json.loads((tmp_path / ".lock").read_text())
        assert f"pid {holder.pid} on host {socket.gethostname()}, started {info['started']}" in str(e.value)
    finally:
        holder.kill()
        holder.wait(30)
    with jobfolder.acquire(tmp_path) as lock:  # the dead holder's lock is taken over, and said so
        assert lock.stale["pid"] == holder.pid and lock.info["pid"] == os.getpid()
    assert not (tmp_path / ".lock").exists()


def test_stale_temp_files_are_recognised(tmp_path):
    names = [".u1.wav.ab12_x9z.tmp", ".results.jsonl.k2j3h4g5.tmp", ".manifest.jsonl.a1b2c3d4.tmp"]
    keep = ["u1.wav", "notes.tmp", ".hidden", "x.wav.tmp"]
    for n in names + keep:
        (tmp_path / n).write_text("x")
    assert jobfolder.remove_stale_temp_files(tmp_path) == sorted(names)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


# ----------------------------------------------------------------------------- whole jobs


def test_finding3_4_8_a_job_records_every_bad_item_and_its_status_counts_every_id(tmp_path, env, prompts):
    """One malformed field never stops a job (3); a rerun, with or without --retry-errors, still exits 3 while
    ids are in error (4); ids are matched whole and a duplicated id is one error (8)."""
    manifest, out = tmp_path / "jobs.jsonl", tmp_path / "out"
    bad_ids = {f"bad_{n}": expected for n, (_, expected) in BAD_FIELDS.items()}
    lines = [json.dumps(_good(0, prompts))] + [_bad_line(n, f, prompts) for n, (f, _) in BAD_FIELDS.items()]
    lines += [json.dumps({**_good(9, prompts), "id": "x\n"}), json.dumps({**_good(9, prompts), "id": "../up"}),
              json.dumps({**_good(9, prompts), "id": "dup"}), "{not json", json.dumps({**_good(8, prompts), "id": "dup"}),
              json.dumps(_good(1, prompts, max_ar_steps=6))]  # fmt: skip
    manifest.write_text("\n".join(lines) + "\n")
    bad_ids.update({"x\n": "use letters, digits", "../up": "use letters, digits", "dup": "is on lines 24, 26 of the manifest",
                    "line25": "not a JSON object"})  # fmt: skip
    args = ["--checkpoint", CKPT, "--manifest", manifest, "--out", out, *COMMON]

    r = _synthesize(args, env)
    assert r.returncode == 3, r.stderr[-3000:]
    results = {x["id"]: x for x in _results(out)}
    assert len(results) == len(_results(out)) == len(bad_ids) + 2  # one line per id
    assert results["good0"]["status"] == results["good1"]["status"] == "ok", results
    for i, expected in bad_ids.items():
        assert results[i]["status"] == "error" and results[i]["kind"] == "permanent", results[i]
        assert expected in results[i]["error"], (i, results[i]["error"])
    assert sorted(p.name for p in out.iterdir()) == ["good0.wav", "good1.wav", "manifest.jsonl", "results.jsonl"]
    assert (out / "manifest.jsonl").read_text() == manifest.read_text()
    job = {"ok": 2, "error": len(bad_ids), "transient": 0, "pending": 0}
    assert _summary(r)["job"] == job

    r2 = _synthesize(args, env)  # nothing to do, and still not all well
    assert r2.returncode == 3 and _summary(r2)["job"] == job and _summary(r2)["skipped"] == len(bad_ids) + 2, r2.stderr
    r3 = _synthesize([*args, "--retry-errors"], env)  # every error tried again: the same errors, nothing lost
    s3 = _summary(r3)
    assert r3.returncode == 3 and s3["error"] == len(bad_ids) and s3["skipped"] == 2 and s3["job"] == job, r3.stderr
    assert {x["id"]: x for x in _results(out)} == {i: {**x} for i, x in results.items()}


def test_finding8_setup_errors_are_one_line_exit_2_and_leave_no_folder(tmp_path, env, prompts):
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(json.dumps(_good(0, prompts)) + "\n")
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "out"
    base = ["--manifest", manifest, "--codec", "encodec", "--heads", str(heads_of(CKPT)), "--quiet"]
    cases = [
        (["--checkpoint", tmp_path / "missing.sft", "--out", out, "--random-codec", "0"], ["missing.sft", "not found"]),
        (["--checkpoint", CKPT, "--out", tmp_path / "a_file" / "out", "--random-codec", "0"], ["cannot write the output folder"]),
        (["--checkpoint", CKPT, "--out", out, "--codec-weights", tmp_path / "nope.th"], ["weights not found", "nope.th"]),
        (["--checkpoint", CKPT, "--out", out, "--random-codec", "0", "--evaluate", "--asr-model", tmp_path / "no-asr"],
         ["--evaluate", "no-asr", "no such folder"]),
        (["--checkpoint", CKPT, "--out", out, "--random-codec", "0", "--top-k", "2.5"], ["--top-k", "expected an integer"]),
        (["--checkpoint", CKPT, "--out", out, "--random-codec", "0", "--beam-width", "-1"], ["beam_width = -1", "integer >= 0"]),
    ]  # fmt: skip
    for args, needles in cases:
        r = _synthesize([*args, *base], env)
        _one_line_error(r, *needles)
        assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "jobs.jsonl"], args


def test_finding8_a_second_job_is_refused_a_killed_one_taken_over_and_the_job_evaluates_itself(tmp_path, env, prompts):
    """The lock names the running job; after a kill its lock and temporary files are dealt with by the rerun,
    which also evaluates the job (--evaluate: OUT/eval/ with metrics.jsonl, summary.json, index.html)."""
    manifest, out = tmp_path / "jobs.jsonl", tmp_path / "out"
    goods = [_good(i, prompts) for i in range(3)]
    manifest.write_text("".join(json.dumps(g) + "\n" for g in goods))
    args = ["--checkpoint", CKPT, "--manifest", manifest, "--out", out, *COMMON]
    first = subprocess.Popen([sys.executable, "-m", "valle_jax.synthesize", *map(str, args)], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((out / ".lock").is_file() and f'"pid": {first.pid}' in (out / ".lock").read_text()):
            assert first.poll() is None, "the first job ended before it was seen holding the lock"
            time.sleep(0.05)
        second = _synthesize(args, env)
        started = json.loads((out / ".lock").read_text())["started"]
        _one_line_error(second, "is in use by another job", f"pid {first.pid} on host {socket.gethostname()}", started)
        assert first.poll() is None, "the first job ended before the second was refused: the test proves nothing"
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    assert (out / ".lock").is_file()  # the killed job's lock file stays behind (its flock went with it)
    temps = [".good0.wav.ab12cd34.tmp", ".results.jsonl.zz99yy88.tmp"]
    for t in temps:
        (out / t).write_bytes(b"half written")
    with open(out / "results.jsonl", "a") as f:
        f.write('{"id": "good1", "sta')  # torn by the kill

    r = _synthesize([*args, "--evaluate"], env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"took over the lock of an earlier job that is gone (pid {first.pid} on host" in r.stderr
    assert "removed 2 temporary file(s) of a killed run" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([f"good{i}.wav" for i in range(3)] + ["eval", "manifest.jsonl", "results.jsonl"])
    assert [(x["id"], x["status"]) for x in _results(out)] == [(f"good{i}", "ok") for i in range(3)]
    metrics = [json.loads(line) for line in (out / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert [m["id"] for m in metrics] == ["good0", "good1", "good2"]
    for m, g in zip(metrics, goods):  # the texts and prompts come from the job's manifest copy
        assert m["text"] == g["text"] and m["prompt"] == [g["prompt"]] and m["transcript"] is not None and m["wer"] is not None
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["n_items"] == 3 and summary["models"]["asr"]["sha256"]
    page = (out / "eval" / "index.html").read_text()
    assert all(f"good{i}" in page for i in range(3))
    assert _summary(r)["evaluation"]["n_items"] == 3


# ----------------------------------------------------------------------------- several processes


def _start_processes(args: list, env: dict, n: int, logs: Path) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for k in range(n):
        with open(logs / f"p{k}.{port}.log", "w") as log:
            cmd = [sys.executable, "-m", "valle_jax.synthesize", *map(str, args), "--coordinator", f"127.0.0.1:{port}",
                   "--num-processes", str(n), "--process-id", str(k)]  # fmt: skip
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    for p in procs:
        p.wait(30)


@pytest.mark.slow
def test_two_processes_run_one_job_each_id_once_also_after_a_kill_and_a_rerun_on_one(tmp_path, env, prompts):
    manifest, out = tmp_path / "jobs.jsonl", tmp_path / "out"
    args = ["--checkpoint", CKPT, "--manifest", manifest, "--out", out, *COMMON, "--batch", "1"]
    listing = lambda items: sorted([f"{g['id']}.wav" for g in items] + ["manifest.jsonl", "results.jsonl"])  # noqa: E731

    items = [_good(i, prompts) for i in range(4)]
    manifest.write_text("".join(json.dumps(g) + "\n" for g in items))
    out.mkdir()
    with jobfolder.acquire(out) as lock:  # a folder in use: both processes refuse, naming its holder
        procs = _start_processes(args, env, 2, tmp_path)
        try:
            codes = [p.wait(TIMEOUT) for p in procs]
        finally:
            _kill(procs)
    logs = [p.read_text() for p in sorted(tmp_path.glob("p*.log"), key=lambda p: p.stat().st_mtime)[-2:]]
    assert codes == [2, 2] and all(f"in use by another job (pid {lock.info['pid']} on host" in log for log in logs), logs
    assert os.listdir(out) == []

    procs = _start_processes(args, env, 2, tmp_path)  # two processes run the job to the end
    try:
        for p in procs:
            p.wait(TIMEOUT)
    finally:
        _kill(procs)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted(tmp_path.glob("p*.log")))
    assert [p.returncode for p in procs] == [0, 0], logs
    results = _results(out)
    assert [(x["id"], x["status"], x["process"]) for x in results] == [(g["id"], "ok", i % 2) for i, g in enumerate(items)]
    assert sorted(p.name for p in out.iterdir()) == listing(items)

    items += [_good(i, prompts) for i in range(4, 12)]  # eight more; process 1 is killed mid-job, then process 0
    manifest.write_text("".join(json.dumps(g) + "\n" for g in items))
    procs = _start_processes(args, env, 2, tmp_path)
    parts = [out / "results.p0.jsonl", out / "results.p1.jsonl"]
    try:
        deadline = time.time() + 300
        while time.time() < deadline and all(p.poll() is None for p in procs):
            if all(jobfolder.read_records(p) for p in parts):
                break
            time.sleep(0.05)
        assert all(p.poll() is None for p in procs), "a process ended before the kill"
        _kill(procs[1:])
        _kill(procs[:1])
    finally:
        _kill(procs)
    shares = [{x["id"] for x in jobfolder.read_records(p)} for p in parts]
    assert shares[0] <= {f"good{i}" for i in range(4, 12, 2)} and shares[1] <= {f"good{i}" for i in range(5, 12, 2)}
    assert shares[0] and shares[1] and len(shares[0] | shares[1]) < 8, shares

    r = _synthesize(args, env)  # one process finishes the job of two
    assert r.returncode == 0, r.stderr[-3000:]
    assert _summary(r)["skipped"] == 4 + len(shares[0] | shares[1])
    assert [(x["id"], x["status"]) for x in _results(out)] == [(g["id"], "ok") for g in items]
    assert sorted(p.name for p in out.iterdir()) == listing(items)


# ----------------------------------------------------------------------------- the demo's last step


def test_demo_evaluates_its_sample_and_says_when_the_number_means_nothing(tmp_path, capsys):
    """Step 5 of the demo on a real spoken sentence (espeak-ng): a real WER; and the same audio flagged as
    meaningless when the demo's codec was the random one (its audio would not be speech)."""
    from valle_jax.demo import evaluate_sample, judge_sample

    text = "The quick brown fox jumps over the lazy dog."
    sample, prompt = tmp_path / "sample.wav", tmp_path / "prompt.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "140", "-w", str(sample), text], check=True)
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(prompt), "A voice prompt for the demo."], check=True)
    found = evaluate_sample(sample, text, prompt, tmp_path, random_codec=False)
    assert found["evaluated"] and found["meaningful"] and found["wer"] < 0.5 and found["sim"] is not None, found
    assert f"evaluation: WER {found['wer']} against" in capsys.readouterr().out
    assert (tmp_path / "eval" / "index.html").is_file()
    metrics = json.loads((tmp_path / "eval" / "metrics.jsonl").read_text())
    noise, said = judge_sample(metrics, text, random_codec=True)  # the same numbers, from the random codec's audio
    assert noise["wer"] == found["wer"] and not noise["meaningful"]
    assert "decoded by a RANDOM codec" in said and "say nothing about the model" in said, said
