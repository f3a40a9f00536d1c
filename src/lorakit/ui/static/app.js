// lorakit ui: the page over the dashboard's JSON API (lorakit/ui/app.py). Charts are drawn by plotly.js.
"use strict";

const $ = (sel) => document.querySelector(sel);
const el = (tag, props = {}, ...children) => {
  const node = Object.assign(document.createElement(tag), props);
  for (const child of children) node.append(child);
  return node;
};
const PLOT = { displaylogo: false, responsive: true };
const state = { runs: [], selected: null, records: [], source: null, fields: [], overlay: new Set(), view: "runs" };

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { "Content-Type": "application/json", ...(options.headers || {}) },
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const err = new Error(body.error || `${response.status} ${response.statusText}`);
    err.status = response.status;
    err.errors = body.errors;
    throw err;
  }
  return body;
}

function banner(message) {
  const node = $("#banner");
  node.textContent = message || "";
  node.hidden = !message;
}

function fmtBytes(n) {
  if (n == null) return "";
  if (n < 1024) return `${n} B`;
  if (n < 1 << 20) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / (1 << 20)).toFixed(1)} MB`;
}
const fmt = (x, digits = 4) => (x == null || Number.isNaN(x) ? "" : Number(x).toPrecision(digits));

// ----- navigation ---------------------------------------------------------------------------------------
function show(view) {
  state.view = view;
  for (const b of document.querySelectorAll("nav button")) b.classList.toggle("active", b.dataset.view === view);
  for (const s of document.querySelectorAll(".view")) s.hidden = s.id !== `view-${view}`;
  if (view === "new") loadForm();
  if (view === "compare") loadCompareList();
  if (view === "chat") loadChatModels();
  if (view === "adapter") loadAdapterList();
  window.dispatchEvent(new Event("resize")); // plotly charts in views that were hidden take their size
}

// ----- runs ---------------------------------------------------------------------------------------------
async function refreshRuns() {
  try {
    const { runs } = await api("/api/runs");
    state.runs = runs;
    banner("");
  } catch (err) {
    banner(`runs: ${err.message}`);
    return;
  }
  const body = $("#runs-table tbody");
  body.replaceChildren();
  $("#runs-empty").hidden = state.runs.length > 0;
  for (const run of state.runs) {
    const overlay = el("input", { type: "checkbox", checked: state.overlay.has(run.name), disabled: run.kind !== "train" });
    overlay.addEventListener("click", (e) => e.stopPropagation());
    overlay.addEventListener("change", () => {
      overlay.checked ? state.overlay.add(run.name) : state.overlay.delete(run.name);
      drawOverlay();
    });
    const steps = run.kind === "train" ? `${run.step}${run.max_steps ? " / " + run.max_steps : ""}` : run.kind;
    const row = el(
      "tr",
      { className: run.name === state.selected ? "selected" : "" },
      el("td", {}, overlay),
      el("td", { textContent: run.name }),
      el("td", {}, el("span", { className: `badge ${run.state}`, textContent: run.state + (run.resumable ? " · resumable" : "") })),
      el("td", { textContent: steps }),
      el("td", { textContent: fmt(run.last_train?.loss) }),
      el("td", { textContent: fmt(run.last_eval?.loss) + (run.retention?.kept_share == null ? "" : ` · retention ${(100 * run.retention.kept_share).toFixed(1)}%`) }),
      el("td", { textContent: fmtBytes(run.adapter_bytes) }),
      el("td", {}),
    );
    row.dataset.run = run.name;
    row.addEventListener("click", () => (run.kind === "compare" ? openCompare(run.name) : selectRun(run.name)));
    body.append(row);
  }
  const current = state.runs.find((r) => r.name === state.selected);
  if (current) showRunState(current);
}

async function selectRun(name) {
  if (state.source) state.source.close();
  state.source = null;
  state.selected = name;
  state.records = [];
  for (const tr of document.querySelectorAll("#runs-table tbody tr")) tr.classList.toggle("selected", tr.dataset.run === name);
  $("#run-detail").hidden = false;
  $("#run-name").textContent = name;
  $("#run-config-download").href = `/api/runs/${name}/config.yaml`;
  const detail = await api(`/api/runs/${name}`);
  $("#run-config").textContent = detail.config_yaml;
  $("#run-log").textContent = detail.log;
  $("#run-progress").textContent = detail.progress;
  showRunState(detail);
  const { records, next } = await api(`/api/runs/${name}/metrics`);
  state.records = records;
  drawRun();
  if (detail.state === "running") follow(name, next);
}

function showRunState(run) {
  const badge = $("#run-state");
  badge.textContent = run.state + (run.resumable ? " · resumable" : "");
  badge.className = `badge ${run.state}`;
  $("#run-stop").hidden = run.state !== "running";
  $("#run-resume").hidden = !run.resumable;
  $("#run-delete").hidden = run.state === "running";
  $("#run-error").textContent = run.state === "failed" && run.error ? run.error : "";
}

// Server-sent events while the run trains: new metrics records extend the curves.
function follow(name, since) {
  const source = new EventSource(`/api/runs/${name}/events?since=${since}`);
  state.source = source;
  source.onmessage = (message) => {
    if (state.selected !== name) return source.close();
    const event = JSON.parse(message.data);
    if (event.reset) state.records = [];
    state.records.push(...event.records);
    if (event.progress) $("#run-progress").textContent = event.progress;
    if (event.log) {
      const log = $("#run-log");
      log.textContent = (log.textContent + event.log).slice(-20000);
    }
    showRunState(event);
    if (event.records.length) drawRun();
    if (event.state !== "running") refreshRuns();
  };
  source.addEventListener("end", () => {
    source.close();
    if (state.source === source) state.source = null;
    refreshRuns();
    if (state.overlay.size) drawOverlay();
  });
  source.onerror = () => {
    source.close();
    if (state.source === source) state.source = null;
  };
}

function series(records, kind, key) {
  const rows = records.filter((r) => r.kind === kind && r[key] != null && Number.isFinite(r[key]));
  return { x: rows.map((r) => r.step), y: rows.map((r) => r[key]) };
}

function layout(title, ytitle) {
  return {
    title: { text: title, font: { size: 13 } },
    margin: { l: 50, r: 10, t: 30, b: 35 },
    xaxis: { title: { text: "step" } },
    yaxis: { title: { text: ytitle } },
    legend: { orientation: "h", y: -0.25 },
  };
}

function drawRun() {
  const r = state.records;
  Plotly.react("chart-loss", [
    { ...series(r, "train", "loss"), name: "train loss", mode: "lines" },
    { ...series(r, "eval", "loss"), name: "eval loss", mode: "lines+markers" },
  ], layout("loss", "loss"), PLOT);
  Plotly.react("chart-lr", [{ ...series(r, "train", "lr"), name: "learning rate", mode: "lines" }], layout("learning rate", "lr"), PLOT);
  const evals = ["exact_match", "accuracy", "prefers_chosen"]
    .map((key) => ({ ...series(r, "eval", key), name: key, mode: "lines+markers" }))
    .filter((t) => t.x.length);
  Plotly.react("chart-eval", evals, layout("evaluation", "share"), PLOT);
}

async function drawOverlay() {
  const node = $("#overlay-chart");
  node.hidden = state.overlay.size === 0;
  if (node.hidden) return;
  const traces = [];
  for (const name of state.overlay) {
    const { records } = await api(`/api/runs/${name}/metrics`);
    traces.push({ ...series(records, "train", "loss"), name: `${name} train`, mode: "lines" });
    const ev = series(records, "eval", "loss");
    if (ev.x.length) traces.push({ ...ev, name: `${name} eval`, mode: "lines+markers", line: { dash: "dot" } });
  }
  Plotly.react(node, traces, layout("loss of the ticked runs", "loss"), PLOT);
}

async function runAction(action) {
  try {
    await api(`/api/runs/${state.selected}/${action}`, { method: "POST" });
    banner("");
    setTimeout(() => selectRun(state.selected), 400);
  } catch (err) {
    banner(`${action}: ${err.message}`);
  }
}

async function deleteRun() {
  const name = state.selected;
  if (!window.confirm(`Delete run ${name} and every file in it (adapter, checkpoints, metrics, log)?`)) return;
  try {
    await api(`/api/runs/${name}`, { method: "DELETE" });
    banner("");
    if (state.source) state.source.close();
    state.source = null;
    state.selected = null;
    state.overlay.delete(name);
    $("#run-detail").hidden = true;
    await refreshRuns();
    await drawOverlay();
  } catch (err) {
    banner(`delete: ${err.message}`);
  }
}

// ----- new run form -------------------------------------------------------------------------------------
async function loadForm() {
  if (state.fields.length) return refreshDataFiles();
  const form = await api("/api/form");
  state.fields = form.fields;
  const holder = $("#form-fields");
  holder.replaceChildren();
  let section = null;
  for (const f of form.fields) {
    if (!section || section.dataset.section !== f.section) {
      section = el("details", { className: "section", open: ["", "data", "lora", "train"].includes(f.section) });
      section.dataset.section = f.section;
      section.append(el("summary", { textContent: f.section_title }));
      holder.append(section);
    }
    section.append(fieldRow(f));
  }
  setDataFiles(form.data_files);
  check();
}

function fieldRow(f) {
  const id = `f-${f.key.replace(/\./g, "-")}`;
  let input;
  if (f.kind === "bool" && !f.optional) {
    input = el("input", { type: "checkbox", checked: f.default === true });
  } else if (f.kind === "choice" || f.kind === "bool") {
    input = el("select"); // an optional bool has three values: unset, true, false
    if (f.optional) input.append(el("option", { value: "", textContent: "(unset)" }));
    for (const c of f.kind === "bool" ? ["true", "false"] : f.choices) input.append(el("option", { value: c, textContent: c }));
    input.value = f.default_text;
  } else {
    input = el("input", { type: "text", value: f.default_text, placeholder: f.optional ? "(unset)" : "" });
    if (f.kind === "int" || f.kind === "float") input.inputMode = "decimal";
    if (f.key === "data.train" || f.key === "data.eval") input.setAttribute("list", "data-files");
  }
  input.id = id;
  input.name = f.key;
  input.dataset.key = f.key;
  input.addEventListener("input", scheduleCheck);
  input.addEventListener("change", scheduleCheck);
  const row = el("div", { className: "field" },
    el("label", { htmlFor: id, textContent: f.key, title: `default: ${f.default_text || "(unset)"}` }),
    input,
    el("small", { textContent: f.help.replace(/``/g, "") }),
    el("span", { className: "error" }));
  row.querySelector(".error").dataset.error = f.key;
  return row;
}

function setDataFiles(files) {
  let list = $("#data-files");
  if (!list) document.body.append((list = el("datalist", { id: "data-files" })));
  list.replaceChildren(...files.map((f) => el("option", { value: f })));
}

async function refreshDataFiles() {
  const form = await api("/api/form");
  setDataFiles(form.data_files);
}

function formValues() {
  const values = {};
  for (const f of state.fields) {
    const input = document.querySelector(`[data-key="${f.key}"]`);
    const text = input.type === "checkbox" ? String(input.checked) : input.value;
    if (text !== f.default_text) values[f.key] = text;
  }
  return values;
}

let checkTimer = null;
function scheduleCheck() {
  clearTimeout(checkTimer);
  checkTimer = setTimeout(check, 350);
}

function showErrors(errors) {
  for (const span of document.querySelectorAll("[data-error]")) {
    const message = (errors || {})[span.dataset.error] || "";
    span.textContent = message;
    span.closest(".field")?.classList.toggle("invalid", Boolean(message));
    if (message) span.closest("details")?.setAttribute("open", "");
  }
}

async function check() {
  const body = { name: $("#f-name").value || null, values: formValues() };
  try {
    const result = await api("/api/form/check", { method: "POST", body: JSON.stringify(body) });
    $("#form-yaml").textContent = result.yaml;
    $("#yaml-download").href = URL.createObjectURL(new Blob([result.yaml], { type: "application/yaml" }));
    $("#yaml-download").download = `${body.name || "config"}.yaml`;
    showErrors(result.errors);
    $("#form-status").textContent = result.ok ? "ready to start" : "";
    return result;
  } catch (err) {
    $("#form-status").textContent = err.message;
    return null;
  }
}

async function startRun(event) {
  event.preventDefault();
  const name = $("#f-name").value.trim();
  const button = $("#start-run");
  button.disabled = true;
  $("#form-status").textContent = "starting...";
  try {
    await api("/api/runs", { method: "POST", body: JSON.stringify({ name, values: formValues() }) });
    $("#form-status").textContent = "";
    $("#f-name").value = "";
    show("runs");
    await refreshRuns();
    await selectRun(name);
  } catch (err) {
    showErrors(err.errors || { _: err.message });
    $("#form-status").textContent = err.message;
  } finally {
    button.disabled = false;
  }
}

// ----- compare ------------------------------------------------------------------------------------------
function fillSelect(select, names, onPick) {
  const current = select.value;
  select.replaceChildren(...names.map((n) => el("option", { value: n, textContent: n })));
  if (names.includes(current)) select.value = current;
  select.onchange = () => onPick(select.value);
  if (select.value) onPick(select.value);
}

async function loadCompareList() {
  await refreshRuns();
  const names = state.runs.filter((r) => r.kind === "compare" && r.state === "finished").map((r) => r.name);
  if (!names.length) $("#compare-table thead").replaceChildren(el("tr", {}, el("th", { textContent: "no finished compare outputs under the runs directory (lorakit compare CONFIG --set output_dir=runs/NAME)" })));
  fillSelect($("#compare-select"), names, showCompare);
}

function openCompare(name) {
  show("compare");
  $("#compare-select").value = name;
  showCompare(name);
}

const COMPARE_COLUMNS = [
  ["method", (r) => r.method], ["status", (r) => r.status], ["trainable %", (r) => fmt(r.trainable_percent, 3)],
  ["runs", (r) => r.runs ?? 1],
  ["exact match", (r) => (r.exact_match == null ? "" : `${(100 * r.exact_match).toFixed(1)}%` + (r.exact_match_sd == null ? "" : ` ± ${(100 * r.exact_match_sd).toFixed(1)}`))],
  ["retention", (r) => (r.retention_kept == null ? "" : `${(100 * r.retention_kept).toFixed(1)}%` + (r.retention_kept_sd == null ? "" : ` ± ${(100 * r.retention_kept_sd).toFixed(1)}`))],
  ["drift KL", (r) => fmt(r.retention_kl, 3)],
  ["eval loss", (r) => fmt(r.eval_loss)], ["step s", (r) => fmt(r.median_step_seconds, 3)],
  ["peak MB", (r) => fmt(r.peak_memory_mb, 4)], ["artifact", (r) => fmtBytes(r.artifact_bytes)],
  ["latency vs base", (r) => fmt(r.latency_vs_base, 3)],
];

async function showCompare(name) {
  const { records } = await api(`/api/runs/${name}/compare`);
  $("#compare-table thead").replaceChildren(el("tr", {}, ...COMPARE_COLUMNS.map(([h]) => el("th", { textContent: h }))));
  $("#compare-table tbody").replaceChildren(...records.map((r) => el("tr", {}, ...COMPARE_COLUMNS.map(([, f]) => el("td", { textContent: f(r) })))));
  const ok = records.filter((r) => r.status === "ok");
  const methods = ok.map((r) => r.method);
  const bar = (key, title, axis, scale = 1) => ({ type: "bar", x: methods, y: ok.map((r) => (r[key] == null ? null : r[key] * scale)), name: title, xaxis: axis.x, yaxis: axis.y });
  const traces = [
    bar("exact_match", "exact match %", { x: "x", y: "y" }, 100),
    bar("peak_memory_mb", "peak memory MB", { x: "x2", y: "y2" }),
    bar("median_step_seconds", "step seconds", { x: "x3", y: "y3" }),
    bar("trainable_percent", "trainable %", { x: "x4", y: "y4" }),
  ];
  Plotly.react("compare-chart", traces, {
    grid: { rows: 1, columns: 4, pattern: "independent" },
    margin: { l: 45, r: 10, t: 40, b: 40 }, showlegend: false,
    annotations: traces.map((t, i) => ({ text: t.name, showarrow: false, xref: `x${i ? i + 1 : ""} domain`, yref: `y${i ? i + 1 : ""} domain`, x: 0.5, y: 1.12 })),
  }, PLOT);
}

// ----- chat ---------------------------------------------------------------------------------------------
async function loadChatModels() {
  const { base, adapters, state: chatState } = await api("/api/chat/models");
  const holder = $("#chat-models");
  const ticked = new Set([...holder.querySelectorAll("input:checked")].map((i) => i.value));
  const options = [{ name: "base", label: `base (${base})` }, ...adapters.map((a) => ({ name: a.name, label: a.name }))];
  holder.replaceChildren(...options.map((o) => {
    const box = el("input", { type: "checkbox", value: o.name, checked: ticked.size ? ticked.has(o.name) : true });
    return el("label", {}, box, o.label);
  }));
  $("#chat-status").textContent = chatState === "ready" ? "" : "the model loads on the first message";
}

async function sendChat() {
  const models = [...document.querySelectorAll("#chat-models input:checked")].map((i) => i.value);
  const prompt = $("#chat-prompt").value;
  if (!models.length || !prompt.trim()) return ($("#chat-status").textContent = "tick a model and write a prompt");
  const answers = $("#chat-answers");
  const boxes = models.map((m) => {
    const text = el("pre");
    const foot = el("div", { className: "foot" });
    return { node: el("div", { className: "answer" }, el("h3", { textContent: m }), text, foot), text, foot };
  });
  answers.replaceChildren(...boxes.map((b) => b.node));
  boxes.forEach((b, i) => (b.node.dataset.model = models[i]));
  $("#chat-send").disabled = true;
  $("#chat-status").textContent = "generating...";
  try {
    const response = await fetch("/api/chat", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        prompt, models, system: $("#chat-system").value || null,
        max_tokens: Number($("#chat-max-tokens").value), temperature: Number($("#chat-temperature").value),
      }),
    });
    if (!response.ok) throw new Error((await response.json().catch(() => ({}))).error || response.statusText);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).replace(/^data: /, "");
        buffer = buffer.slice(cut + 2);
        if (line === "[DONE]") continue;
        const event = JSON.parse(line);
        const box = boxes[event.index];
        if (event.text) box.text.textContent += event.text;
        if (event.error) { box.foot.textContent = `error: ${event.error}`; box.node.classList.add("failed"); }
        if (event.finish_reason) { box.foot.textContent = `${event.completion_tokens} tokens · ${event.finish_reason}`; box.node.dataset.done = "1"; }
      }
    }
    $("#chat-status").textContent = "";
  } catch (err) {
    $("#chat-status").textContent = `chat: ${err.message}`;
  } finally {
    $("#chat-send").disabled = false;
  }
}

// ----- adapter ------------------------------------------------------------------------------------------
async function loadAdapterList() {
  await refreshRuns();
  const names = state.runs.filter((r) => r.has_adapter).map((r) => r.name);
  if (state.selected && names.includes(state.selected)) $("#adapter-select").value = state.selected;
  fillSelect($("#adapter-select"), names, showAdapter);
}

const ADAPTER_COLUMNS = [
  ["layer path", (s) => s.path], ["rank", (s) => s.rank], ["scaling", (s) => fmt(s.scaling, 3)],
  ["‖ΔW‖", (s) => fmt(s.norm)], ["effective rank", (s) => fmt(s.effective_rank, 3)],
  ["energy top 1", (s) => fmt(s.energy_top1, 3)], ["energy top k", (s) => fmt(s.energy_topk, 3)],
];

async function showAdapter(name) {
  const { layers, top_k } = await api(`/api/runs/${name}/inspect`);
  ADAPTER_COLUMNS[6][0] = `energy top ${top_k}`;
  $("#adapter-table thead").replaceChildren(el("tr", {}, ...ADAPTER_COLUMNS.map(([h]) => el("th", { textContent: h }))));
  $("#adapter-table tbody").replaceChildren(...layers.map((s) => el("tr", {}, ...ADAPTER_COLUMNS.map(([, f]) => el("td", { textContent: f(s) })))));
  const modules = [...new Set(layers.map((s) => s.module))].sort();
  const rows = [...new Set(layers.map((s) => (s.layer == null ? "other" : s.layer)))].sort((a, b) => (a === "other") - (b === "other") || a - b);
  const z = rows.map(() => modules.map(() => null));
  for (const s of layers) z[rows.indexOf(s.layer == null ? "other" : s.layer)][modules.indexOf(s.module)] = s.norm;
  Plotly.react("adapter-heatmap", [{ type: "heatmap", z, x: modules, y: rows.map(String), colorscale: "Viridis", colorbar: { title: { text: "‖ΔW‖_F" } } }], {
    title: { text: `${name}: ‖ΔW‖ per layer and module`, font: { size: 13 } },
    margin: { l: 60, r: 10, t: 40, b: 80 }, yaxis: { title: { text: "layer" }, type: "category" },
  }, PLOT);
}

// ----- start --------------------------------------------------------------------------------------------
async function start() {
  for (const b of document.querySelectorAll("nav button")) b.addEventListener("click", () => show(b.dataset.view));
  $("#run-stop").addEventListener("click", () => runAction("stop"));
  $("#run-resume").addEventListener("click", () => runAction("resume"));
  $("#run-delete").addEventListener("click", deleteRun);
  $("#new-form").addEventListener("submit", startRun);
  $("#f-name").addEventListener("input", scheduleCheck);
  $("#chat-send").addEventListener("click", sendChat);
  try {
    const info = await api("/api/info");
    $("#info").textContent = `runs: ${info.runs} · model: ${info.model} · lorakit ${info.version}`;
  } catch (err) {
    banner(err.message);
  }
  await refreshRuns();
  setInterval(() => state.view === "runs" && refreshRuns(), 3000);
}

start();
