"""lorakit ui: the dashboard's API over a runs directory (the browser test is in test_ui_browser.py).

Runs launched here train a tiny random LLaMA in a child process, as the page would start them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

import lorakit
from lorakit.cli.main import main
from lorakit.train.checkpoint import list_checkpoints
from lorakit.train.config import load_config, reference
from lorakit.train.metrics import read_metrics
from lorakit.ui import Workspace, create_app
from lorakit.ui.forms import HIDDEN, form_fields
from lorakit.ui.runs import Launched
from tests.conftest import colour_rows, randomize_adapters, write_jsonl

RUN = {  # a tiny run of the colour task on tiny_lm_dir, as the form sends it (every value as text)
    "data.train": "data/train.jsonl",
    "data.eval": "data/eval.jsonl",
    "data.max_length": "32",
    "lora.r": "4",
    "train.max_steps": "6",
    "train.batch_size": "8",
    "train.lr": "5e-2",
    "train.max_new_tokens": "4",
}


@pytest.fixture
def workspace(tmp_path, tiny_lm_dir):
    root = tmp_path / "runs"
    (root / "data").mkdir(parents=True)
    write_jsonl(root / "data" / "train.jsonl", colour_rows(48))
    write_jsonl(root / "data" / "eval.jsonl", colour_rows(8, seed=1))
    outside = tmp_path / "outside"
    outside.mkdir()
    write_jsonl(outside / "secret.jsonl", colour_rows(4))
    (root / "data" / "link.jsonl").symlink_to(outside / "secret.jsonl")
    return root


@pytest.fixture
def client(workspace, tiny_lm_dir):
    app = create_app(Workspace(workspace), str(tiny_lm_dir))
    with TestClient(app, base_url="http://127.0.0.1:7860") as c:
        yield c


def check(client, values, name=None):
    response = client.post("/api/form/check", json={"name": name, "values": values})
    assert response.status_code == 200, response.text
    return response.json()


def events(client, name: str, timeout: float = 180) -> list[dict]:
    """The run's server-sent events until the stream ends."""
    out = []
    deadline = time.monotonic() + timeout
    with client.stream("GET", f"/api/runs/{name}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: {}":
                out.append(json.loads(line[6:]))
            assert time.monotonic() < deadline, "the run did not end in time"
    return out


def wait_for(predicate, timeout: float = 120, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not met in time")


# ----- the form -------------------------------------------------------------------------------------------------
def test_form_fields_are_the_config_reference():
    fields = {f["key"]: f for f in form_fields()}
    expected = [(k, d, h) for k, d, h in reference() if k not in HIDDEN and not k.startswith("compare.")]
    assert list(fields) == [k for k, _, _ in expected]
    for key, default, help_text in expected:
        assert fields[key]["default"] == default and fields[key]["help"] == help_text
    assert fields["train.scheduler"]["kind"] == "choice" and fields["train.scheduler"]["choices"] == [
        "constant", "linear", "cosine"
    ]  # fmt: skip
    assert fields["data.packing"]["kind"] == "bool" and fields["lora.r"]["kind"] == "int"
    assert fields["lora.target_modules"]["kind"] == "yaml" and fields["quantize"]["optional"]


def test_check_gives_the_yaml_a_valid_form_makes(client, workspace):
    result = check(client, {**RUN, "lora.target_modules": "[q_proj, v_proj]", "data.packing": "true"}, name="a")
    assert result["ok"] and result["errors"] == {}
    data = yaml.safe_load(result["yaml"])
    assert data["output_dir"] == "a" and data["lora"]["target_modules"] == ["q_proj", "v_proj"]
    cfg = load_config(None, [f"{k}={v}" for k, v in RUN.items()] + ["lora.target_modules=[q_proj, v_proj]"])
    (workspace / "a.yaml").write_text(result["yaml"])
    again = load_config(workspace / "a.yaml")
    assert again.train == cfg.train and again.lora == cfg.lora and again.data.packing


@pytest.mark.parametrize(
    "values, field, words",
    [
        ({"train.max_steps": "many"}, "train.max_steps", "wrong type"),
        ({"train.lr": "-1"}, "train.lr", "positive"),
        ({"train.scheduler": "exponential"}, "train.scheduler", "use one of"),
        ({"data.train": "../outside/secret.jsonl"}, "data.train", "'..' is not allowed"),
        ({"data.train": "data/link.jsonl"}, "data.train", "leads outside"),
        ({"data.train": "/etc/passwd"}, "data.train", "leads outside"),
        ({"data.train": "data/missing.jsonl"}, "data.train", "does not exist"),
        ({"data.eval": "/etc/hosts"}, "data.eval", "leads outside"),
        ({"objective": "dpo", "dpo.reference_adapter": "../x"}, "dpo.reference_adapter", "'..'"),
        ({"model": "/usr"}, "model", "its own model"),
        ({"train.tracking_uri": "sqlite:////tmp/x.db"}, "train.tracking_uri", "http(s)"),
        ({"output_dir": "/tmp/x"}, "output_dir", "set by the dashboard"),
        ({"train.nope": "1"}, "train.nope", "unknown field"),
    ],
)
def test_each_problem_is_shown_next_to_its_field(client, values, field, words):
    result = check(client, {**RUN, **values}, name="b")
    assert not result["ok"]
    assert words in result["errors"][field], result["errors"]
    assert set(result["errors"]) == {field}


def test_a_cross_field_problem_is_shown_on_every_field_it_names(client):
    result = check(client, {**RUN, "train.batch_size": "6", "train.grad_accum": "4"})
    assert set(result["errors"]) == {"train.batch_size", "train.grad_accum"}
    assert "not divisible" in result["errors"]["train.grad_accum"]


def test_missing_training_data_and_bad_run_names(client, workspace):
    (workspace / "taken").mkdir()
    (workspace / "taken" / "config.yaml").write_text("model: default\n")
    assert "choose the training data" in check(client, {}, name="c")["errors"]["data.train"]
    for name, words in (("taken", "already exists"), ("../up", "invalid run name"), ("/abs", "invalid run name"),
                        ("a/../../b", "invalid run name"), ("", "invalid run name"),
                        ("data/x", "inside the data directory")):  # fmt: skip
        assert words in check(client, RUN, name=name)["errors"]["name"], name
    response = client.post("/api/runs", json={"name": "d", "values": {**RUN, "train.lr": "0"}})
    assert response.status_code == 422 and "train.lr" in response.json()["errors"]
    assert not (workspace / "d").exists()  # nothing is written for a refused form


# ----- launching, watching, stopping, resuming ------------------------------------------------------------------
def test_a_run_started_from_the_form_streams_its_curves_and_finishes(client, workspace):
    response = client.post("/api/runs", json={"name": "first", "values": RUN})
    assert response.status_code == 201, response.text
    assert (workspace / "first" / "launch.yaml").is_file()
    seen = events(client, "first")
    records = [r for e in seen for r in e["records"]]
    written = [json.loads(line) for line in (workspace / "first" / "metrics.jsonl").read_text().splitlines()]
    assert records == written  # every record arrives once, in order
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert seen[0]["state"] == "running" and seen[-1]["state"] == "finished"
    assert "adapter written" in "".join(e["log"] for e in seen)

    runs = {r["name"]: r for r in client.get("/api/runs").json()["runs"]}
    first = runs["first"]
    assert first["state"] == "finished" and first["step"] == 6 and first["max_steps"] == 6
    assert first["adapter_bytes"] == (workspace / "first" / "adapter_model.safetensors").stat().st_size
    assert first["last_eval"] == [r for r in written if r["kind"] == "eval"][-1]
    detail = client.get("/api/runs/first").json()
    assert "config.yaml" in detail["files"] and detail["config"]["train"]["max_steps"] == 6
    download = client.get("/api/runs/first/config.yaml")
    assert download.status_code == 200 and yaml.safe_load(download.text)["lora"]["r"] == 4
    assert "attachment" in download.headers["content-disposition"]
    assert client.get("/api/runs/first/metrics", params={"since": 3}).json()["records"] == written[3:]
    log = client.get("/api/runs/first/log").json()
    assert log["log"].startswith("$ lorakit train first/launch.yaml") and log["progress"].startswith("adapter written")
    # a second start under the same name is refused: the run is there
    again = client.post("/api/runs", json={"name": "first", "values": RUN})
    assert again.status_code == 422 and "already exists" in again.json()["errors"]["name"]
    # deleted from the page: the dashboard lets go of the process it launched, and the name is free again
    assert client.delete("/api/runs/first").status_code == 200
    assert not (workspace / "first").exists()
    assert "first" not in [r["name"] for r in client.get("/api/runs").json()["runs"]]


def train_steps(d: Path) -> list[int]:
    """The steps of the run's train records (a line still being written is left out)."""
    path = d / "metrics.jsonl"
    return [r["step"] for r in read_metrics(path) if r["kind"] == "train"] if path.is_file() else []


def exit_code(process: subprocess.Popen, d: Path, timeout: float = 120) -> int:
    """The exit code of a launched run once it has ended; if it does not end in time, what it was doing."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc = Path(f"/proc/{process.pid}/status")
        masks = [line for line in proc.read_text().splitlines() if line.startswith("Sig")] if proc.is_file() else []
        log = (d / "train.log").read_text(errors="replace")[-2000:]
        raise AssertionError(f"the run did not end within {timeout} s of its stop; {masks}\n{log}") from None


def test_stop_writes_a_checkpoint_and_resume_continues_from_it(client, workspace):
    """Only a stop can end this run (a million steps: it cannot finish during the test however fast the machine
    is), and every wait is for what the next assertion needs: the stopped process has exited, so its state and
    status.json are final."""
    ws = client.app.state.ui.ws
    d = workspace / "long"
    long_run = {**RUN, "train.max_steps": "1000000", "train.lr": "1e-3"}
    assert client.post("/api/runs", json={"name": "long", "values": long_run}).status_code == 201
    first = ws.launched["long"].process
    wait_for(lambda: len(train_steps(d)) >= 3 or first.poll() is not None)  # in the steps (past eval_before)
    assert first.poll() is None, (d / "train.log").read_text()
    assert client.post("/api/runs/long/stop").status_code == 200
    assert exit_code(first, d) == 130  # SIGINT's code: the trainer stopped itself, after writing a checkpoint
    summary = client.get("/api/runs/long").json()
    assert summary["state"] == "interrupted" and summary["resumable"] and summary["exit_code"] == 130, summary
    stopped_at = summary["step"]
    assert stopped_at >= 3 and train_steps(d) == list(range(1, stopped_at + 1))
    assert list_checkpoints(d / "checkpoints")[-1].name == f"step-{stopped_at:07d}"  # at the last step's end
    status = json.loads((d / "status.json").read_text())
    assert (status["state"], status["error"], status["pid"]) == ("interrupted", "stopped by SIGINT", first.pid)
    assert client.post("/api/runs/long/stop").status_code == 409  # not running

    assert client.post("/api/runs/long/resume").status_code == 200
    assert client.post("/api/runs/long/resume").status_code == 409  # already running
    second = ws.launched["long"].process
    assert second is not first
    wait_for(lambda: max(train_steps(d), default=0) >= stopped_at + 2 or second.poll() is not None)
    assert second.poll() is None, (d / "train.log").read_text()
    assert client.post("/api/runs/long/stop").status_code == 200
    assert exit_code(second, d) == 130
    assert client.get("/api/runs/long").json()["state"] == "interrupted"
    steps = train_steps(d)
    assert len(steps) >= stopped_at + 2
    assert steps == list(range(1, len(steps) + 1))  # resumed at the checkpoint: no step twice, none missing
    assert "--resume" in (d / "train.log").read_text()


def test_states_of_runs_started_elsewhere(client, workspace):
    def make(name, **files):
        d = workspace / name
        d.mkdir(parents=True)
        for f, text in files.items():
            (d / f.replace("_", ".", 1) if "_" in f else d / f).write_text(text)
        return d

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    host = os.uname().nodename
    killed = make("killed", status_json=json.dumps({"state": "running", "pid": dead_pid, "host": host}))
    (killed / "checkpoints" / "step-00000002").mkdir(parents=True)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        make("live", status_json=json.dumps({"state": "running", "pid": alive.pid, "host": host}))
        make("broken", status_json=json.dumps({"state": "failed", "pid": 1, "error": "ValueError: bad row"}))
        old = make("old", config_yaml="model: default\n")
        (old / "adapter_model.safetensors").write_bytes(b"x" * 10)
        make("cmp", results_json="[]", **{"compare-config.yaml": "compare: {methods: [lora]}\n"})
        runs = {r["name"]: r for r in client.get("/api/runs").json()["runs"]}
        assert runs["killed"]["state"] == "interrupted" and runs["killed"]["resumable"]
        assert runs["live"]["state"] == "running"
        assert runs["broken"]["state"] == "failed" and runs["broken"]["error"] == "ValueError: bad row"
        assert not runs["broken"]["resumable"]
        assert runs["old"]["state"] == "finished" and runs["old"]["adapter_bytes"] == 10
        assert runs["cmp"]["kind"] == "compare" and runs["cmp"]["state"] == "finished"
        # stopping a process that is not lorakit's (a recycled pid) is refused
        response = client.post("/api/runs/live/stop")
        assert response.status_code == 409 and "not lorakit's" in response.json()["error"]
        assert alive.poll() is None
    finally:
        alive.send_signal(signal.SIGKILL)
        alive.wait()


class EndsAsPolled:
    """A launched training process that writes its last status.json and exits just as the dashboard polls it,
    after the dashboard could have read the status that still said running."""

    def __init__(self, d: Path, state: str, code: int, error: str | None) -> None:
        self.d, self.state, self.code, self.error, self.pid = d, state, code, error, os.getpid()

    def poll(self) -> int:
        record = {"state": self.state, "pid": self.pid, "host": os.uname().nodename, "updated": time.time(),
                  "error": self.error}  # fmt: skip
        (self.d / "status.json").write_text(json.dumps(record))
        return self.code


@pytest.mark.parametrize(
    ("ended", "code", "error"),
    [("finished", 0, None), ("interrupted", 130, "stopped by SIGINT"), ("failed", 1, "ValueError: bad row")],
)
def test_a_run_that_ends_as_its_state_is_read_shows_how_it_ended(workspace, ended, code, error):
    """The state reads status.json after polling the process: read before, a run that finished in between showed
    as interrupted (its status still said running, with its process gone), without its error."""
    d = workspace / "racing"
    d.mkdir()
    running = {"state": "running", "pid": os.getpid(), "host": os.uname().nodename, "updated": time.time()}
    (d / "status.json").write_text(json.dumps(running))
    ws = Workspace(workspace)
    ws.launched["racing"] = Launched(EndsAsPolled(d, ended, code, error), log=None, started=time.time() - 60)
    state = ws.state("racing", d)
    assert (state["state"], state["error"], state["exit_code"]) == (ended, error, code)


def test_delete_removes_a_run_and_refuses_what_is_not_one(client, workspace, tiny_lm_dir):
    save_run(workspace, "done", tiny_lm_dir, seed=1)
    save_run(workspace, "group/a", tiny_lm_dir, seed=2)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = workspace / "live"
        live.mkdir()
        status = {"state": "running", "pid": alive.pid, "host": os.uname().nodename}
        (live / "status.json").write_text(json.dumps(status))
        response = client.delete("/api/runs/live")
        assert response.status_code == 409 and "stop it before deleting" in response.json()["error"]
        assert (live / "status.json").is_file()
    finally:
        alive.send_signal(signal.SIGKILL)
        alive.wait()
    for name, status in [("group", 404), ("data", 404), ("nowhere", 404), ("..%2Foutside", 403)]:
        response = client.delete(f"/api/runs/{name}")
        assert response.status_code == status, (name, response.text)
    assert (workspace / "group" / "a" / "adapter_model.safetensors").is_file()
    assert (workspace / "data" / "train.jsonl").is_file()
    response = client.delete("/api/runs/done", headers={"Origin": "http://evil.example"})
    assert response.status_code == 403 and (workspace / "done").is_dir()  # cross-origin: refused
    assert client.delete("/api/runs/done").json() == {"name": "done", "deleted": True}
    assert client.delete("/api/runs/group/a").status_code == 200
    assert not (workspace / "done").exists() and not (workspace / "group" / "a").exists()
    assert not [p for p in workspace.iterdir() if p.name.startswith(".deleting")]
    names = [r["name"] for r in client.get("/api/runs").json()["runs"]]
    assert "done" not in names and "group/a" not in names and "live" in names


# ----- refused paths and requests -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path, status",
    [
        ("/api/runs/..%2F..%2Fetc", 403),
        ("/api/runs/%2Fetc/metrics", 403),
        ("/api/runs/escape", 403),
        ("/api/runs/escape/inspect", 403),
        ("/api/runs/nowhere", 404),
        ("/api/runs/a%00b/metrics", 403),
        ("/static/..%2Fapp.py", 404),
        ("/api/nothing", 404),
    ],
)
def test_paths_outside_the_runs_directory_are_refused(client, workspace, tmp_path, path, status):
    (workspace / "escape").symlink_to(tmp_path / "outside")
    response = client.get(path)
    assert response.status_code == status, response.text
    assert "error" in response.json()


def test_a_resume_that_fails_shows_failed_with_its_error(client, workspace):
    d = workspace / "broken"
    (d / "checkpoints" / "step-00000002").mkdir(parents=True)  # an empty checkpoint: the trainer refuses it
    (d / "status.json").write_text(json.dumps({"state": "interrupted", "pid": 1, "updated": time.time() - 60}))
    (d / "config.yaml").write_text("data: {train: data/train.jsonl}\ntrain: {max_steps: 0}\n")
    response = client.post("/api/runs/broken/resume")
    assert response.status_code == 400 and "train.max_steps" in response.json()["error"]  # the config is checked first
    (d / "config.yaml").write_text(f"model: {client.app.state.ui.model}\ndata: {{train: ../data/train.jsonl}}\n")
    assert client.post("/api/runs/broken/resume").status_code == 200
    summary = wait_for(lambda: (s := client.get("/api/runs/broken").json())["state"] != "running" and s)
    assert summary["state"] == "failed" and "checkpoint" in summary["error"], summary
    assert summary["resumable"]  # the checkpoint directory is still there to retry with


def test_resume_refuses_a_config_that_reads_outside(client, workspace, tmp_path):
    d = workspace / "foreign"
    (d / "checkpoints" / "step-00000001").mkdir(parents=True)
    config = {"model": "default", "output_dir": "elsewhere", "data": {"train": str(tmp_path / "outside/secret.jsonl")}}
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    (d / "status.json").write_text(json.dumps({"state": "interrupted", "pid": 1}))
    response = client.post("/api/runs/foreign/resume")
    assert response.status_code == 403 and "leads outside" in response.json()["error"]
    assert not (d / "train.log").exists()


def test_token_is_required_and_checked(workspace, tiny_lm_dir):
    app = create_app(Workspace(workspace), str(tiny_lm_dir), token="s3cret-token", host="0.0.0.0")
    with TestClient(app, base_url="http://192.0.2.7:7860") as c:
        assert c.get("/api/runs").status_code == 401
        assert c.get("/").status_code == 401
        wrong = c.get("/api/runs", headers={"Authorization": "Bearer s3cret-tokem"})
        assert wrong.status_code == 401 and "wrong token" in wrong.json()["error"]
        assert c.get("/?token=nope").status_code == 401
        assert c.get("/api/runs", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
        opened = c.get("/?token=s3cret-token", follow_redirects=False)
        assert opened.status_code == 303 and opened.headers["location"] == "/"
        assert "httponly" in opened.headers["set-cookie"].lower()
        assert c.get("/").status_code == 200  # the cookie now carries the token
        assert c.get("/api/runs").status_code == 200
        c.cookies.clear()
        assert c.post("/api/runs/x/stop").status_code == 401


def test_other_hosts_and_origins_are_refused_without_a_token(client):
    assert client.get("/api/runs", headers={"Host": "attacker.example"}).status_code == 403
    assert client.get("/api/runs", headers={"Host": "localhost:7860"}).status_code == 200
    response = client.post("/api/form/check", json={"values": {}}, headers={"Origin": "http://attacker.example"})
    assert response.status_code == 403 and "cross-origin" in response.json()["error"]
    same = client.post("/api/form/check", json={"values": {}}, headers={"Origin": "http://127.0.0.1:7860"})
    assert same.status_code == 200


def test_the_page_and_its_scripts_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "<title>lorakit</title>" in page.text
    assert client.get("/static/app.js").status_code == 200
    chart = client.get("/static/plotly.min.js")
    assert chart.status_code == 200 and len(chart.content) > 1_000_000
    info = client.get("/api/info").json()
    assert info["chat"] == "not loaded" and not info["token"]


def test_cli_refuses_a_public_address_without_a_token(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("LORAKIT_UI_TOKEN", raising=False)
    assert main(["ui", "--runs", str(tmp_path), "--host", "0.0.0.0"]) == 2
    assert "give --token" in capsys.readouterr().err
    assert main(["ui", "--runs", str(tmp_path), "--host", "0.0.0.0", "--token", "short"]) == 2
    assert "shorter than 8" in capsys.readouterr().err


# ----- adapters: inspect, compare, chat -------------------------------------------------------------------------
def save_run(workspace, name, model_dir, seed, model_spec=None):
    model, _ = lorakit.load_model(model_dir)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear", init="random"))
    randomize_adapters(model, seed=seed, scale=0.4)
    d = workspace / name
    lorakit.save_adapter(model, d)
    (d / "config.yaml").write_text(yaml.safe_dump({"model": model_spec or str(model_dir)}))
    (d / "status.json").write_text(json.dumps({"state": "finished", "pid": 1}))
    return d


def test_inspect_and_compare_endpoints(client, workspace, tiny_lm_dir):
    d = save_run(workspace, "adapted", tiny_lm_dir, seed=1)
    body = client.get("/api/runs/adapted/inspect").json()
    expected = lorakit.analysis.inspect_adapter(d)
    assert [row["path"] for row in body["layers"]] == [s.path for s in expected.layers]
    assert [row["norm"] for row in body["layers"]] == pytest.approx([s.norm for s in expected.layers], rel=1e-9)
    assert {row["module"] for row in body["layers"]} >= {"q_proj", "down_proj"}
    assert client.get("/api/runs/adapted/compare").status_code == 404
    cmp = workspace / "cmp"
    cmp.mkdir()
    records = [{"method": "lora", "status": "ok", "exact_match": 0.5}, {"method": "full", "status": "failed"}]
    (cmp / "results.json").write_text(json.dumps(records))
    (cmp / "results.md").write_text("| method |\n")
    body = client.get("/api/runs/cmp/compare").json()
    assert body["runs"] == records and body["markdown"].startswith("| method")
    # one row per method, as results.md: over one seed each, the run's own figures
    assert [(r["method"], r["status"], r["runs"]) for r in body["records"]] == [
        ("lora", "ok", 1),
        ("full", "failed", 0),
    ]
    assert body["records"][0]["exact_match"] == 0.5 and body["records"][0]["exact_match_sd"] is None
    assert client.get("/api/runs/cmp/inspect").status_code == 404


def chat(client, models, prompt="colour of item 3?", max_tokens=8):
    body = {"prompt": prompt, "models": models, "max_tokens": max_tokens}
    texts, finish, errors = [""] * len(models), [None] * len(models), [None] * len(models)
    with client.stream("POST", "/api/chat", json=body) as response:
        assert response.status_code == 200, response.read()
        chunks = 0
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            chunks += 1
            i = event["index"]
            texts[i] += event.get("text", "")
            finish[i] = event.get("finish_reason", finish[i])
            errors[i] = event.get("error", errors[i])
    return texts, finish, errors, chunks


def test_chat_answers_with_the_base_and_adapters_side_by_side(client, workspace, tiny_lm_dir, capsys):
    save_run(workspace, "one", tiny_lm_dir, seed=1)
    save_run(workspace, "two", tiny_lm_dir, seed=2)
    (workspace / "empty").mkdir()
    (workspace / "empty" / "config.yaml").write_text("model: default\n")
    save_run(workspace, "other-model", tiny_lm_dir, seed=3, model_spec="default")
    listed = client.get("/api/chat/models").json()
    assert [a["name"] for a in listed["adapters"]] == ["one", "other-model", "two"]

    texts, finish, errors, chunks = chat(client, ["base", "one", "two", "empty", "other-model"])
    assert errors[:3] == [None] * 3 and all(finish[:3])
    assert "no adapter" in errors[3] and "trained on model 'default'" in errors[4]
    assert chunks > 5  # streamed token by token
    for text, adapter in zip(texts[:3], [None, "one", "two"], strict=True):
        args = ["generate", "--model", str(tiny_lm_dir), "--chat", "colour of item 3?", "--max-new-tokens", "8"]
        args += ["--adapter", str(workspace / adapter)] if adapter else []
        capsys.readouterr()
        assert main(args) == 0
        assert text == capsys.readouterr().out[:-1], adapter  # each row routed to its adapter in one batch
    assert len(set(texts[:3])) == 3

    # a retrained run is loaded again: its new weights answer
    model, _ = lorakit.load_model(tiny_lm_dir)
    lorakit.load_adapter(model, workspace / "two")
    lorakit.save_adapter(model, workspace / "one")  # "one" now holds two's weights
    os.utime(workspace / "one" / "adapter_model.safetensors", (time.time() + 5, time.time() + 5))
    again, *_ = chat(client, ["one", "two"])
    assert again[0] == again[1] == texts[2]


def test_chat_refuses_bad_requests(client):
    assert client.post("/api/chat", json={"prompt": "", "models": ["base"]}).status_code == 400
    assert client.post("/api/chat", json={"prompt": "x", "models": []}).status_code == 400
    assert client.post("/api/chat", json={"prompt": "x", "models": ["base"], "max_tokens": 0}).status_code == 400
    response = client.post("/api/chat", json={"prompt": "x", "models": ["../../etc"]})
    assert response.status_code == 403
    assert client.post("/api/chat", json={"prompt": "x", "models": ["nope"]}).status_code == 404
    too_long = client.post("/api/chat", json={"prompt": "x", "models": ["base"], "max_tokens": 1000})
    assert too_long.status_code == 400 and "context" in too_long.json()["error"]


def test_data_files_are_listed_without_symlinks(client, workspace):
    (workspace / "a-run").mkdir()
    (workspace / "a-run" / "metrics.jsonl").write_text("{}\n")
    files = client.get("/api/form").json()["data_files"]
    assert files == ["data/eval.jsonl", "data/train.jsonl"]  # not the link, not a run's files


def test_a_data_directory_outside_the_runs(workspace, tmp_path, tiny_lm_dir):
    data = tmp_path / "shared-data"
    data.mkdir()
    write_jsonl(data / "rows.jsonl", colour_rows(16))
    ws = Workspace(workspace, data)
    with TestClient(create_app(ws, str(tiny_lm_dir)), base_url="http://127.0.0.1:7860") as c:
        assert c.get("/api/form").json()["data_files"] == [str(data.resolve() / "rows.jsonl")]
        ok = check(c, {**RUN, "data.train": str(data / "rows.jsonl")}, name="x")
        assert ok["ok"], ok["errors"]
        assert check(c, {**RUN, "data.eval": str(tmp_path / "outside" / "secret.jsonl")})["errors"]["data.eval"]


def test_status_file_follows_the_trainer(run_config, monkeypatch):
    """status.json: running while it trains, then finished; interrupted on Ctrl-C; failed with the error."""
    from lorakit.train import trainer
    from lorakit.train.metrics import read_status

    cfg = run_config("train.max_steps=2", out="ok")
    seen = []
    original = trainer._train

    def spy(*args, **kwargs):
        seen.append(read_status(cfg_out)["state"])
        return original(*args, **kwargs)

    cfg_out = Path(cfg.output_dir)
    monkeypatch.setattr(trainer, "_train", spy)
    trainer.train(cfg, progress=False)
    assert seen == ["running"]
    status = read_status(cfg_out)
    assert status["state"] == "finished" and status["step"] == 2 and status["pid"] == os.getpid()

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(trainer, "_train", boom)
    bad = run_config(out="bad")
    with pytest.raises(RuntimeError):
        trainer.train(bad, progress=False)
    assert read_status(Path(bad.output_dir))["error"] == "RuntimeError: disk on fire"

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_train", interrupt)
    stopped = run_config(out="stopped")
    with pytest.raises(KeyboardInterrupt):
        trainer.train(stopped, progress=False)
    assert read_status(Path(stopped.output_dir))["state"] == "interrupted"


def test_metrics_are_read_again_only_when_the_file_changes(workspace):
    ws = Workspace(workspace)
    d = workspace / "r"
    d.mkdir()
    path = d / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1}\n')
    first = ws.records(d)
    assert ws.records(d) is first  # unchanged: the parsed records are reused
    with open(path, "a") as f:
        f.write('{"kind": "train", "step": 2}\n')
    assert [r["step"] for r in ws.records(d)] == [1, 2]
    path.write_text('{"kind": "train", "step": 1}\n')  # a resume rewrote it shorter
    assert ws.metrics("r", since=2) == {"records": [{"kind": "train", "step": 1}], "next": 1, "reset": True}
