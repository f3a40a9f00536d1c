"""lorakit.durable and every writer built on it: at any instant a write leaves the old output or the new one, whole.

The kill -9 tests run each writer in a forked child that SIGKILLs itself just before its k-th file-system step
(``os.fsync``, ``os.rename``, ``os.replace``, ``os.unlink``, ``os.rmdir``: every rename, sync and removal, the
removals inside ``shutil.rmtree`` included), for k = 1, 2, ... until the writer completes. After each kill the
parent reads the output the way lorakit's next reader or writer does (which recovers what the crash left) and
asserts that it is exactly the old output or exactly the new one, and that the next write's recovery leaves no
leftovers. No sleeps, no races: each kill point is one exact place in the write.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit import durable
from lorakit.io import read_adapter

from .conftest import FAMILIES, randomize_adapters

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux", reason="forks; Linux paths")

STEPS = ("fsync", "rename", "replace", "unlink", "rmdir")  # the file-system steps a kill can precede


# ----- the harness --------------------------------------------------------------------------------------------
def _in_child(action: Callable[[], None], kill_at: int) -> bool:
    """Run ``action`` in a forked child that SIGKILLs itself just before its ``kill_at``-th file-system step (0:
    never). True when it was killed; False when it finished first (an error in the child fails the test)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            torch.set_num_threads(1)  # no OpenMP pool after a fork
            count = [0]

            def counted(real):
                def step(*args, **kwargs):
                    count[0] += 1
                    if count[0] == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return real(*args, **kwargs)

                return step

            for name in STEPS:
                setattr(os, name, counted(getattr(os, name)))
            action()
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0, "the writer failed in the child (its traceback is in the captured stderr)"
    return False


def _leftovers(where: Path) -> list[str]:
    """Durable-write siblings (temporaries, aside copies, journals) anywhere under ``where``."""
    return sorted(
        str(Path(root, n).relative_to(where))
        for root, dirs, files in os.walk(where)
        for n in dirs + files
        if durable._LEFTOVER.fullmatch(n)
    )


def _clean_up_as_the_next_write(where: Path) -> None:
    """What the next write recovers before it starts, in every folder (the test owns them all)."""
    for root, _, _ in list(os.walk(where)):
        durable.recover(root, owner=True)


def crash_everywhere(where: Path, setup, write, read, *, limit: int = 400) -> dict:
    """Kill ``write`` before each of its file-system steps in turn, each time on a fresh ``setup``; after each kill
    ``read`` (lorakit's next reader, recovering) must give the old output or the new one. Returns how often each
    was seen (both must be: the kill points straddle the commit) and the number of kill points."""

    def fresh():
        shutil.rmtree(where, ignore_errors=True)
        where.mkdir(parents=True)
        setup(where)

    fresh()
    old = read(where)
    assert not _in_child(lambda: write(where), 0)
    new = read(where)
    assert new != old, "the write must change the output"
    seen = {"old": 0, "new": 0}
    for k in range(1, limit):
        fresh()
        killed = _in_child(lambda: write(where), k)
        state = read(where)
        assert state in (old, new), f"kill before step {k}: the output is neither the old nor the new one"
        seen["old" if state == old else "new"] += 1
        _clean_up_as_the_next_write(where)
        assert read(where) == state and not _leftovers(where), (k, _leftovers(where))
        if not killed:
            assert state == new
            seen["points"] = k - 1
            break
    else:
        raise AssertionError(f"the write did not finish within {limit} steps")
    assert seen["old"] and seen["new"], seen
    return seen


def snapshot(path: Path):
    """A file's bytes, a directory's files by relative path (hidden leftovers apart), or None when absent."""
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and not any(durable._LEFTOVER.fullmatch(part) for part in p.relative_to(path).parts)
    }


@pytest.fixture(autouse=True)
def _quiet_fork(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # the tokenizers library warns on a fork otherwise


def _lora_model(seed: int = 1, r: int = 4):
    family = FAMILIES["llama"]
    model = family.build()
    lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=8, target_modules=family.targets))
    randomize_adapters(model, seed=seed)
    return model


def _tiny_llama(seed: int, vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


# ----- unit tests: the recipe itself -------------------------------------------------------------------------
def test_new_outputs_are_whole_and_nothing_is_left_beside_them(tmp_path):
    durable.write_bytes(tmp_path / "a.bin", b"one")
    durable.write_bytes(tmp_path / "a.bin", b"two")
    durable.write_text(tmp_path / "b.txt", "text")
    durable.write_many({tmp_path / "c": b"c1", tmp_path / "d": b"d1"})
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "old.txt").write_text("old")
    with durable.replace_dir(tmp_path / "dir") as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "new.txt").write_text("new")
    with durable.replace_dir(tmp_path / "fresh" / "made") as staging:  # missing parents are created
        (staging / "x").write_text("x")
    assert snapshot(tmp_path) == {
        "a.bin": b"two", "b.txt": b"text", "c": b"c1", "d": b"d1", "dir/sub/new.txt": b"new", "fresh/made/x": b"x",
    }  # fmt: skip
    assert not _leftovers(tmp_path)
    durable.delete(tmp_path / "dir")
    durable.delete(tmp_path / "a.bin")
    assert not (tmp_path / "dir").exists() and not (tmp_path / "a.bin").exists() and not _leftovers(tmp_path)


def test_a_writer_that_fails_midway_keeps_the_old_output(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError, match="midway"), durable.replace_dir(target) as staging:
        (staging / "half.txt").write_text("half")
        raise RuntimeError("midway")
    (tmp_path / "f").write_bytes(b"old")
    with pytest.raises(RuntimeError, match="midway"), durable.replace_file(tmp_path / "f") as tmp:
        tmp.write_bytes(b"ha")
        raise RuntimeError("midway")
    with pytest.raises(TypeError):  # the second file cannot be written: neither is replaced
        durable.write_many({tmp_path / "f": b"new", tmp_path / "g": "not bytes"})
    assert snapshot(tmp_path) == {"out/keep.txt": b"old", "f": b"old"} and not _leftovers(tmp_path)


def test_a_failed_move_into_place_puts_the_old_directory_back(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    rename = Path.rename

    def failing(self, other):
        if ".tmp-" in self.name:
            raise OSError(18, "Invalid cross-device link")
        return rename(self, other)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError, match="cross-device"), durable.replace_dir(target) as staging:
        (staging / "new.txt").write_text("new")
    assert snapshot(tmp_path) == {"out/keep.txt": b"old"} and not _leftovers(tmp_path)


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_leftovers_of_a_crash_are_recognised_and_recovered(tmp_path):
    dead, live = _dead_pid(), os.getppid()
    # a swap cut between its renames: the output is missing, its old copy aside -> put back; the staging goes
    (tmp_path / f".out.old-{dead}").mkdir()
    (tmp_path / f".out.old-{dead}" / "f").write_text("old")
    (tmp_path / f".out.tmp-{dead}").mkdir()
    (tmp_path / f".out.tmp-{dead}" / "f").write_text("new")
    # a swap cut after its second rename: the old copy is garbage
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "f").write_text("new")
    (tmp_path / f".done.old-{dead}").mkdir()
    # a committed write_many cut in its renames -> rolled forward
    (tmp_path / "a").write_text("a-old")
    (tmp_path / "b").write_text("b-old")
    (tmp_path / f".a.tmp-{dead}").write_text("a-new")
    (tmp_path / f".b.tmp-{dead}").write_text("b-new")
    (tmp_path / f".a.commit-{dead}").write_text(json.dumps([[f".a.tmp-{dead}", "a"], [f".b.tmp-{dead}", "b"]]))
    # a write_many cut before its journal: its temporaries go, the old files stay
    (tmp_path / "c").write_text("c-old")
    (tmp_path / f".c.tmp-{dead}").write_text("c-ne")
    # a delete cut short
    (tmp_path / f".gone.del-{dead}").mkdir()
    # a live process's write, and a staging directory shared by processes (no PID): not ours to touch
    (tmp_path / f".busy.tmp-{live}").write_text("busy")
    (tmp_path / ".step.tmp-sharded").mkdir()
    (tmp_path / ".notes.txt").write_text("a user's hidden file")

    durable.recover(tmp_path, clean=False)  # a reader: puts outputs back together, removes nothing
    assert (tmp_path / "out" / "f").read_text() == "old" and (tmp_path / "a").read_text() == "a-new"
    assert (tmp_path / "b").read_text() == "b-new" and (tmp_path / f".out.tmp-{dead}").exists()
    durable.recover(tmp_path)  # the next write
    assert snapshot(tmp_path) == {
        "out/f": b"old", "done/f": b"new", "a": b"a-new", "b": b"b-new", "c": b"c-old", ".notes.txt": b"a user's hidden file",
    }  # fmt: skip
    assert _leftovers(tmp_path) == [f".busy.tmp-{live}", ".step.tmp-sharded"]
    durable.recover(tmp_path, owner=True)  # the caller owns the folder: every leftover is stale
    assert not _leftovers(tmp_path)


def test_durable_writes_sync_data_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """What kill -9 cannot show, a power cut would: the new data must be on disk before the rename that makes it
    the output, the rename on disk (the parent synced) before the old output is removed."""
    from lorakit.export.files import staged_directory
    from lorakit.train.metrics import MetricsLog, RunStatus

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")

    def truncate():
        MetricsLog(tmp_path / "metrics.jsonl").truncate_after(2)

    def export():
        with staged_directory(tmp_path / "out", True) as staging:
            (staging / "new.txt").write_text("new")

    def status():
        RunStatus(tmp_path).set("finished", step=3)

    for action, final in [(truncate, "metrics.jsonl"), (export, "out"), (status, "status.json")]:
        trace = _trace(monkeypatch, action)
        _assert_synced_then_renamed_then_removed(trace, tmp_path / final)
    trace = _trace(monkeypatch, lambda: MetricsLog(tmp_path / "metrics.jsonl").write({"step": 3}))
    assert ("fsync", str(tmp_path / "metrics.jsonl")) in trace  # each appended record is synced


def _trace(monkeypatch, action) -> list[tuple]:
    """The file-system steps ``action`` takes, with absolute paths."""
    trace: list[tuple] = []

    def where(path, dir_fd=None):
        if isinstance(path, int):
            return os.readlink(f"/proc/self/fd/{path}")
        base = os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else ""
        return os.path.join(base, os.fspath(path))

    def record(name, real):
        def step(*args, **kwargs):
            paths = [where(a, kwargs.get("dir_fd")) for a in args[: 1 if name in ("fsync", "unlink", "rmdir") else 2]]
            trace.append((name, *paths))
            return real(*args, **kwargs)

        return step

    with monkeypatch.context() as m:
        for name in STEPS:
            m.setattr(os, name, record(name, getattr(os, name)))
        action()
    return trace


def _assert_synced_then_renamed_then_removed(trace: list[tuple], final: Path) -> None:
    final_s, parent_s = str(final), str(final.parent)
    i = max(n for n, step in enumerate(trace) if step[0] in ("rename", "replace") and step[2] == final_s)
    source = trace[i][1]
    synced = {step[1] for step in trace[:i] if step[0] == "fsync"}
    files = [final] if final.is_file() else [p for p in final.rglob("*") if p.is_file()]
    for f in files:
        assert os.path.join(source, os.path.relpath(f, final)).rstrip("/.") in synced | {source}, (f, trace)
    after = [n for n, step in enumerate(trace) if n > i and step == ("fsync", parent_s)]
    assert after, f"the folder of {final} is not synced after the rename"
    removals = [n for n, step in enumerate(trace) if step[0] in ("unlink", "rmdir") and ".old-" in step[1]]
    assert all(n > after[0] for n in removals), "the old output is removed before the new one is on disk"
    assert not [s for s in trace[:i] if s[0] in ("unlink", "rmdir") and s[1].startswith(final_s)], trace


# ----- kill -9 of each writer ----------------------------------------------------------------------------------
def test_kill_9_during_an_adapter_save_leaves_the_old_or_the_new_adapter(tmp_path):
    """The new adapter has another rank: its weights beside the old config (or the reverse) would not load."""
    old, new = _lora_model(seed=1), _lora_model(seed=2, r=2)

    def setup(where):
        lorakit.save_adapter(old, where / "adapter")
        (where / "adapter" / "README.md").write_text("mine")

    def write(where):
        lorakit.save_adapter(new, where / "adapter")

    def read(where):
        read_adapter(where / "adapter")  # loading finishes a save cut short
        return snapshot(where / "adapter")

    crash_everywhere(tmp_path / "w", setup, write, read)


@pytest.mark.parametrize("again", [True, False], ids=["same-step-saved-again", "first-save"])
def test_kill_9_during_a_checkpoint_leaves_the_old_or_the_new_checkpoint(tmp_path, again):
    from lorakit.methods.lora import LoraMethod
    from lorakit.train.checkpoint import list_checkpoints, save_checkpoint

    model = _lora_model(seed=1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    method = LoraMethod()

    def setup(where):
        if again:
            save_checkpoint(where / "checkpoints", 4, model, optimizer, scheduler, method, {"skipped": 0})

    def write(where):
        randomize_adapters(model, seed=2)
        random.seed(0)  # a forked child's random module is reseeded; the checkpoint records its state
        save_checkpoint(where / "checkpoints", 4, model, optimizer, scheduler, method, {"skipped": 1})

    def read(where):
        listed = [p.name for p in list_checkpoints(where / "checkpoints")]  # what --resume looks at
        state = snapshot(where / "checkpoints" / "step-0000004")
        assert listed == ([] if state is None else ["step-0000004"])
        return state

    crash_everywhere(tmp_path / "w", setup, write, read)


def test_kill_9_during_an_fsdp_publish_leaves_the_old_or_the_new_checkpoint(tmp_path):
    from lorakit.train import fsdp
    from lorakit.train.checkpoint import list_checkpoints, step_dir

    def fill(directory: Path, tag: str) -> None:
        (directory / "sharded").mkdir(parents=True)
        for rank in range(2):
            (directory / "sharded" / f"shard-{rank}.safetensors").write_bytes(tag.encode() * 100)
            (directory / f"rng-rank{rank:05d}.safetensors").write_bytes(tag.encode())
        (directory / "trainer_state.json").write_text(json.dumps({"step": 4, "tag": tag}))

    def setup(where):
        fill(step_dir(where, 4), "old")
        fill(durable.sibling(step_dir(where, 4), "tmp", "sharded"), "new")  # as the loop stages it

    def write(where):
        fsdp.publish(durable.sibling(step_dir(where, 4), "tmp", "sharded"), step_dir(where, 4), where)

    def read(where):
        assert [p.name for p in list_checkpoints(where)] == ["step-0000004"]
        return snapshot(step_dir(where, 4))

    crash_everywhere(tmp_path / "w", setup, write, read)


def test_kill_9_during_a_merge_leaves_the_old_or_the_new_model(tmp_path, tiny_tokenizer):
    from lorakit.cli.merge import save_merged

    old, new = _tiny_llama(0, len(tiny_tokenizer)), _tiny_llama(1, len(tiny_tokenizer))

    def read(where):
        durable.recover(where, "merged", clean=False)  # what `lorakit merge` (and every write) does first
        return snapshot(where / "merged")

    seen = crash_everywhere(
        tmp_path / "w",
        lambda where: save_merged(old, tiny_tokenizer, where / "merged"),
        lambda where: save_merged(new, tiny_tokenizer, where / "merged"),
        read,
    )
    assert seen["points"] > 10  # the old model's files are removed one by one, after the new one is in place


def test_kill_9_of_lorakit_merge_as_its_output_is_swapped_in(tmp_path, tiny_lm_dir):
    """The command itself, killed between moving the previous --out aside and moving the new one in: the
    next `lorakit merge` finds the previous --out in place (and refuses to overwrite it without --overwrite)."""
    from lorakit.cli.main import main

    model, _ = lorakit.load_model(tiny_lm_dir)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init="random"))
    lorakit.save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "merged"
    args = ["merge", "--model", str(tiny_lm_dir), "--adapter", str(tmp_path / "adapter"), "--out", str(out)]
    assert main(args) == 0
    before = snapshot(out)
    pid = os.fork()
    if pid == 0:
        try:
            torch.set_num_threads(1)
            rename = os.rename

            def dying(src, dst, *a, **k):
                if Path(src).name.startswith(".merged.tmp-"):  # the new model, about to be moved in
                    os.kill(os.getpid(), signal.SIGKILL)
                return rename(src, dst, *a, **k)

            os.rename = dying
            main([*args, "--overwrite", "--dtype", "bfloat16"])
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert not out.exists()  # killed in the middle of the swap: the previous --out is aside
    assert main(args) == 2  # without --overwrite: refused, as the previous --out is there again
    assert snapshot(out) == before
    assert main([*args, "--overwrite", "--dtype", "bfloat16"]) == 0 and not _leftovers(tmp_path)


def test_kill_9_during_an_export_leaves_the_old_or_the_new_artifact(tmp_path):
    from lorakit.export.files import check_target, staged_directory, staged_file

    def setup(where):
        (where / "ollama").mkdir()
        (where / "ollama" / "Modelfile").write_text("FROM old.gguf\n")
        (where / "ollama" / "old.gguf").write_bytes(b"GGUF old" * 50)
        (where / "adapter.gguf").write_bytes(b"GGUF old" * 50)

    def write_directory(where):  # an Ollama or vLLM export
        with staged_directory(where / "ollama", True) as staging:
            (staging / "Modelfile").write_text("FROM model.gguf\nADAPTER adapter.gguf\n")
            (staging / "model.gguf").write_bytes(b"GGUF new" * 50)
            (staging / "adapter.gguf").write_bytes(b"GGUF new adapter")

    def write_file(where):  # a GGUF export
        with staged_file(where / "adapter.gguf", True) as staging:
            staging.write_bytes(b"GGUF new" * 60)

    def read(where):
        check_target(where / "ollama", True, directory=True)  # what the next export checks first
        check_target(where / "adapter.gguf", True, directory=False)
        return snapshot(where / "ollama"), snapshot(where / "adapter.gguf")

    crash_everywhere(tmp_path / "w", setup, write_directory, read)
    crash_everywhere(tmp_path / "w", setup, write_file, read)


def test_kill_9_during_a_model_conversion_leaves_the_old_or_the_new_cache_entry(tmp_path, tiny_tokenizer, monkeypatch):
    import transformers

    from lorakit import models

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "w" / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")  # its stat names the cache entry; what it converts to comes from `converted`
    converted = {"model": _tiny_llama(0, len(tiny_tokenizer))}
    new = _tiny_llama(1, len(tiny_tokenizer))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: converted["model"])
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tiny_tokenizer)
    target = models._cache_dir_for(gguf)

    def write(where):
        converted["model"] = new  # in the child only
        models.convert_gguf(gguf, force=True)

    def read(where):
        durable.recover(target.parent, target.name, clean=False)  # as convert_gguf does before it looks
        assert models._cache_complete(target)  # never a partial entry: the next load uses it as it is
        return snapshot(target)

    crash_everywhere(tmp_path / "w", lambda where: models.convert_gguf(gguf), write, read)


def test_kill_9_during_metrics_rewrites_leaves_the_old_or_the_new_file(tmp_path):
    from lorakit.train.metrics import MetricsLog, RunStatus, read_metrics, read_status

    def setup(where):
        (where / "metrics.jsonl").write_text("".join(json.dumps({"kind": "train", "step": s}) + "\n" for s in range(9)))
        RunStatus(where).set("running", step=8)

    def truncate(where):  # a resume drops the records after its checkpoint
        MetricsLog(where / "metrics.jsonl").truncate_after(4)

    def finish(where):
        RunStatus(where).set("finished", step=12)

    def steps(where):
        return [r["step"] for r in read_metrics(where / "metrics.jsonl")]

    def state(where):
        status = read_status(where)  # None for a file cut short
        return status and status["state"]

    crash_everywhere(tmp_path / "w", setup, truncate, steps)
    crash_everywhere(tmp_path / "w", setup, finish, state)


def test_kill_9_during_a_dashboard_delete_leaves_the_whole_run_or_none(tmp_path):
    from lorakit.ui.runs import Workspace

    def setup(where):
        run = where / "runs" / "r1"
        (run / "checkpoints" / "step-0000002").mkdir(parents=True)
        (run / "checkpoints" / "step-0000002" / "adapter_model.safetensors").write_bytes(b"w" * 100)
        (run / "config.yaml").write_text("model: m\n")
        (run / "status.json").write_text(json.dumps({"state": "finished", "pid": 1}))
        (run / "metrics.jsonl").write_text('{"step": 1}\n')
        (where / "runs" / "other").mkdir()
        (where / "runs" / "other" / "config.yaml").write_text("model: m\n")

    def write(where):
        Workspace(where / "runs").delete("r1")

    def read(where):
        names = [n for n, _ in Workspace(where / "runs").names()]  # the dashboard, opened after the crash
        state = snapshot(where / "runs" / "r1")
        assert names == (["other"] if state is None else ["other", "r1"])
        assert not [p for p in (where / "runs").iterdir() if p.name.startswith(".")]  # nothing half deleted
        return state

    crash_everywhere(tmp_path / "w", setup, write, read)
