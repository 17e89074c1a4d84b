"""The lm-eval plugin end to end on the default model: the launcher runs a shipped offline task with and without a
press (the press must shrink the stored KV, as recorded by the model type), bad compression options fail before the
model loads, and compress_loglikelihood scores continuations on a compressed cache."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from kvpress.eval.launcher import TASKS_DIR, with_include_path  # noqa: E402

pytestmark = pytest.mark.slow

_SMALL = '{"max_seq_lengths":[512],"num_samples":2}'


def _launch(args: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """`python -m kvpress.eval.launcher ARGS` offline, from `cwd`, with the Triton interpreter switched off."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "kvpress.eval.launcher", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _run_task(tmp_path: Path, model_args: str, name: str) -> dict:
    """Run kvpress_niah_single on 2 samples of 512 tokens; return lm-eval's results JSON."""
    out = tmp_path / name
    proc = _launch(["--model", "kvpress", "--model_args", model_args, "--tasks", "kvpress_niah_single",
                    "--limit", "2", "--device", "cpu", "--apply_chat_template", "--metadata", _SMALL,
                    "--gen_kwargs", "max_gen_toks=4", "--output_path", str(out)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    files = list(out.rglob("results_*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def test_include_path_added_unless_given():
    assert with_include_path(["--model", "kvpress"])[-2:] == ["--include_path", str(TASKS_DIR)]
    assert with_include_path(["ls", "tasks"])[-1] == str(TASKS_DIR)
    assert with_include_path(["--tasks", "x", "--include_path", "/mine"]) == ["--tasks", "x", "--include_path", "/mine"]
    assert with_include_path(["--include_path=/mine"]) == ["--include_path=/mine"]
    assert with_include_path(["--help"]) == ["--help"]
    assert (TASKS_DIR / "kvpress_niah_single.yaml").is_file()


def test_launcher_runs_offline_task_and_press_shrinks_stored_kv(tmp_path):
    plain = _run_task(tmp_path, "pretrained=default", "plain")
    pressed = _run_task(tmp_path, "pretrained=default,press=snapkv:0.5", "snapkv")
    for results in (plain, pressed):
        score = results["results"]["kvpress_niah_single"]["score,none"]
        assert 0.0 <= score <= 1.0
        assert results["n-samples"]["kvpress_niah_single"]["effective"] == 2
        assert results["config"]["kvpress"]["caches"] == 2
    full, kept = plain["config"]["kvpress"], pressed["config"]["kvpress"]
    assert full["press"] is None and full["kept_fraction"] == 1.0
    assert "SnapKVPress" in kept["press"]
    assert kept["logical_tokens"] == full["logical_tokens"] > 900  # same prompts: ~2 x (500 prompt + 4 generated)
    assert kept["kept_fraction"] < 0.6  # half of each prompt evicted; the few generated tokens are kept
    assert kept["nbytes"] < 0.7 * full["nbytes"]


def test_bad_press_spec_fails_before_loading(tmp_path):
    proc = _launch(["--model", "kvpress", "--model_args", "pretrained=default,press=snapkv:1.5",
                    "--tasks", "kvpress_niah_single", "--limit", "1", "--device", "cpu"], cwd=tmp_path, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "kvpress model_args" in output and "compression_ratio" in output
    assert "Loading weights" not in output


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"press": "nosuch:0.5"}, "unknown press name"),
        ({"quant": "int3"}, "kvpress model_args"),
        ({"paged": "maybe"}, "not a boolean"),
        ({"press": "h2o:0.5:max_tokens=512", "recent": 64}, "quote a press spec"),
        ({"compress_loglikelihood": "sometimes"}, "compress_loglikelihood"),
    ],
)
def test_bad_model_args_raise_clear_errors(kwargs, message):
    from kvpress.eval.lm_eval_model import KVPressLM

    with pytest.raises(ValueError, match=message):
        KVPressLM(pretrained="/nonexistent/model/dir", device="cpu", **kwargs)


@pytest.fixture(scope="module")
def context_and_continuation():
    from kvpress.default_model import default_model_path
    from kvpress.eval.tasks.haystack import read_window
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_path())
    ids = tok(" ".join(s.text for s in read_window(0, 400))).input_ids
    return ids[:320], ids[320:326]


def test_compress_loglikelihood_scores_on_compressed_cache(context_and_continuation):
    from kvpress.eval.lm_eval_model import KVPressLM

    ctx, cont = context_and_continuation
    lm = KVPressLM(pretrained="default", device="cpu", compress_loglikelihood=True)
    [(reference, ref_greedy)] = super(KVPressLM, lm)._loglikelihood_tokens([(None, ctx, cont)], disable_tqdm=True)
    [(uncompressed, greedy)] = lm._loglikelihood_tokens([(None, ctx, cont)], disable_tqdm=True)
    assert uncompressed == pytest.approx(reference, abs=1e-3) and greedy == ref_greedy
    assert lm.last_cache_stats["stored_tokens"] == lm.last_cache_stats["logical_tokens"] == len(ctx) + len(cont) - 1

    pressed = KVPressLM(pretrained="default", device="cpu", press="knorm:0.75", compress_loglikelihood=True)
    compressed, _ = pressed.score_compressed(ctx, cont)
    stats = pressed.last_cache_stats
    assert stats["stored_tokens"] < 0.5 * stats["logical_tokens"]
    assert compressed != pytest.approx(reference, abs=1e-3)
    assert pressed.cache_summary()["caches"] == 1


def test_loglikelihood_untouched_by_default(context_and_continuation):
    from kvpress.eval.lm_eval_model import KVPressLM

    ctx, cont = context_and_continuation
    lm = KVPressLM(pretrained="default", device="cpu", press="knorm:0.75")
    lm._loglikelihood_tokens([(None, ctx, cont)], disable_tqdm=True)
    assert lm.cache_summary()["caches"] == 0 and lm.last_cache_stats is None
