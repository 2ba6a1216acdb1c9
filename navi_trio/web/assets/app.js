// The navi-trio web chat page: sessions over HTTP, runs over the session's WebSocket.
//
// The history over HTTP is the truth for finished answers; the one answer still streaming
// is held in `state.live` and drawn after the history. Every run event carries a seq, and
// an event is applied only if its seq is above the highest one applied (`live.seq`), so a
// replay, a resume or a second delivery never doubles text. After a drop or a reload the
// page reconnects with `?run_id=R&after=N` (the live answer is kept in sessionStorage,
// with its seq, so a reload resumes where it was), with backoff.

import { renderMarkdown } from "./markdown.js";

const $ = (sel) => document.querySelector(sel);
const TOKEN_KEY = "navi.token";
const liveKey = (sid) => `navi.live.${sid}`;
const MAX_IMAGES = 8;
const MAX_IMAGE_BYTES = 50 * 1024 * 1024;
const TITLE_CHARS = 60;
const BACKOFF_MS = [250, 500, 1000, 2000, 4000, 8000];
// A connection silent for this long is dead. The server sends a heartbeat whenever it sent
// nothing else for heartbeat_s (20 s by default); the page learns that period from the
// heartbeats themselves and waits three of them (at least WATCHDOG_MIN_MS).
const WATCHDOG_MS = 65000;
const WATCHDOG_MIN_MS = 3000;

const state = {
  sessions: [],
  sid: null,
  history: [],
  historyLoads: 0,
  ws: null,
  wsGen: 0,
  retries: 0,
  retryTimer: null,
  watchdog: null,
  watchdogMs: WATCHDOG_MS,
  heartbeatGapMs: 0,
  lastFrameAt: 0,
  openWaiters: [],
  live: null, // the answer streaming: {runId, seq, content, thinking, thinkingDone, tools, notes, status, note, finished}
  lastNote: null, // the note of the last finished answer (e.g. its error), kept across the history reload
  pending: null, // a message sent and not yet answered by its stream_start (or an error)
  images: [], // data: URLs
  files: [], // {name, path}
};

// ---------------------------------------------------------------------------------------
// HTTP with the token, and the token prompt.

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

let tokenPrompt = null;

/** Ask for a token (one dialog however many callers); resolves once one is stored. */
function askToken(reason) {
  if (!tokenPrompt) {
    tokenPrompt = new Promise((resolve) => {
      const dialog = $("#token-dialog");
      $("#token-reason").textContent = reason;
      $("#token-input").value = "";
      $("#token-form").onsubmit = (ev) => {
        ev.preventDefault();
        const token = $("#token-input").value.trim();
        if (!token) return;
        localStorage.setItem(TOKEN_KEY, token);
        dialog.close();
        tokenPrompt = null;
        resolve();
      };
      dialog.oncancel = (ev) => ev.preventDefault(); // nothing works without one
      dialog.showModal();
      $("#token-input").focus();
    });
  }
  return tokenPrompt;
}

async function api(method, path, body, contentType) {
  for (;;) {
    const headers = {};
    const token = localStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = `Bearer ${token}`;
    let payload;
    if (body !== undefined) {
      headers["Content-Type"] = contentType || "application/json";
      payload = contentType ? body : JSON.stringify(body);
    }
    let r;
    try {
      r = await fetch(path, { method, headers, body: payload });
    } catch {
      throw new ApiError(0, "The server cannot be reached.");
    }
    if (r.status === 401) {
      await askToken(token ? "That token was not accepted. Enter a valid token." : "This server needs a token.");
      continue;
    }
    if (r.status === 204) return null;
    const data = await r.json().catch(() => ({}));
    if (!r.ok) throw new ApiError(r.status, data.detail || `The server answered ${r.status}.`);
    return data;
  }
}

// ---------------------------------------------------------------------------------------
// Notices and the connection indicator.

let noticeTimer = null;

function showNotice(text, sticky = false) {
  const n = $("#notice");
  n.textContent = text;
  n.hidden = false;
  clearTimeout(noticeTimer);
  if (!sticky) noticeTimer = setTimeout(() => (n.hidden = true), 8000);
}

function setConnection(kind) {
  const c = $("#connection");
  c.dataset.state = kind;
  c.textContent = { connected: "", reconnecting: "Reconnecting…", offline: "Offline", idle: "" }[kind] ?? "";
}

// ---------------------------------------------------------------------------------------
// Sessions.

async function loadSessions() {
  try {
    state.sessions = await api("GET", "/sessions");
  } catch (err) {
    showNotice(`Could not load your chats: ${err.message}`);
    return;
  }
  state.sessions.sort((a, b) => String(b.created_at).localeCompare(String(a.created_at)));
  renderSessions();
}

function renderSessions() {
  const ul = $("#sessions");
  ul.replaceChildren();
  for (const s of state.sessions) {
    const li = document.createElement("li");
    const open = document.createElement("a");
    open.href = `#/s/${encodeURIComponent(s.id)}`;
    open.className = "session";
    open.dataset.id = s.id;
    open.textContent = s.title || "Untitled";
    if (s.id === state.sid) open.setAttribute("aria-current", "page");
    const del = document.createElement("button");
    del.type = "button";
    del.className = "delete";
    del.title = "Delete this chat";
    del.textContent = "×";
    del.onclick = () => deleteSession(s);
    li.append(open, del);
    ul.append(li);
  }
  const current = state.sessions.find((s) => s.id === state.sid);
  $("#title").textContent = current ? current.title : "New chat";
}

async function deleteSession(s) {
  if (!confirm(`Delete “${s.title}”? Its history and uploads are removed.`)) return;
  try {
    await api("DELETE", `/sessions/${encodeURIComponent(s.id)}`);
  } catch (err) {
    if (err.status !== 404) return showNotice(`Could not delete the chat: ${err.message}`);
  }
  state.sessions = state.sessions.filter((x) => x.id !== s.id);
  if (s.id === state.sid) location.hash = "";
  renderSessions();
}

/** The current session, created (titled after `hint`) if this is a new chat. */
async function ensureSession(hint) {
  if (state.sid) return state.sid;
  const line = (hint || "").trim().split("\n")[0];
  const title = line.length > TITLE_CHARS ? `${line.slice(0, TITLE_CHARS - 1)}…` : line || "New chat";
  const s = await api("POST", "/sessions", { title });
  state.sessions.unshift(s);
  history.replaceState(null, "", `#/s/${encodeURIComponent(s.id)}`);
  await openSession(s.id);
  return s.id;
}

function sessionFromHash() {
  const m = location.hash.match(/^#\/s\/([A-Za-z0-9_-]{1,64})$/);
  return m ? m[1] : null;
}

/** Show session `sid` (or a new chat for null): its history, then its live stream. */
async function openSession(sid) {
  closeSocket();
  state.sid = sid;
  state.history = [];
  state.live = null;
  state.lastNote = null;
  state.pending = null;
  state.files = [];
  renderAttachments();
  renderSessions();
  if (!sid) {
    renderMessages();
    return;
  }
  restoreLive(sid);
  renderMessages();
  await loadHistory();
  if (state.sid === sid) connect();
}

async function loadHistory() {
  const sid = state.sid;
  const load = ++state.historyLoads;
  let messages;
  try {
    messages = await api("GET", `/sessions/${encodeURIComponent(sid)}/messages`);
  } catch (err) {
    if (state.sid !== sid) return;
    if (err.status === 404) return sessionGone();
    showNotice(`Could not load the history: ${err.message}`);
    return;
  }
  if (state.sid !== sid || load !== state.historyLoads) return; // a later load wins
  state.history = messages;
  // A load that began after the live answer ended has it, saved: draw it from there.
  const live = state.live;
  if (live && live.finished && live.settledBy < load) {
    state.lastNote = live.note || null;
    state.live = null;
  }
  renderMessages();
}

function sessionGone() {
  showNotice("This chat no longer exists.");
  state.sessions = state.sessions.filter((s) => s.id !== state.sid);
  clearLive(state.sid);
  location.hash = "";
  openSession(null);
}

// ---------------------------------------------------------------------------------------
// Drawing messages.

const STATUS_WORDS = {
  running: "answering…",
  complete: "",
  stopped: "stopped",
  error: "failed",
  interrupted: "interrupted",
};

function messageElement(role, status) {
  const m = document.createElement("article");
  m.className = `message ${role}`;
  m.dataset.role = role;
  if (role === "assistant") m.dataset.status = status;
  return m;
}

function fillMessage(m, msg) {
  const role = msg.role;
  m.replaceChildren();
  if (role === "assistant") {
    m.dataset.status = msg.status;
    if (msg.thinking) m.append(thinkingElement(msg.thinking, msg.thinkingOpen));
    if (msg.tool_calls && msg.tool_calls.length) {
      const tools = document.createElement("div");
      tools.className = "tools";
      for (const t of msg.tool_calls) tools.append(toolCard(t));
      m.append(tools);
    }
    for (const note of msg.notes || []) {
      const n = document.createElement("div");
      n.className = "event-note";
      n.textContent = note;
      m.append(n);
    }
  }
  const content = document.createElement("div");
  content.className = "content";
  if (role === "assistant") content.append(renderMarkdown(msg.content || ""));
  else content.textContent = msg.content;
  m.append(content);
  if (msg.images && msg.images.length) {
    const row = document.createElement("div");
    row.className = "thumbs";
    for (const src of msg.images) {
      const img = document.createElement("img");
      img.src = src;
      img.alt = "attached image";
      row.append(img);
    }
    m.append(row);
  }
  if (msg.files && msg.files.length) {
    const row = document.createElement("div");
    row.className = "file-list";
    row.textContent = `Files: ${msg.files.map((f) => f.name).join(", ")}`;
    m.append(row);
  }
  if (role === "assistant") {
    const words = STATUS_WORDS[msg.status] ?? msg.status;
    if (words || msg.note) {
      const s = document.createElement("div");
      s.className = "status";
      s.textContent = [words && words[0].toUpperCase() + words.slice(1), msg.note].filter(Boolean).join(": ");
      m.append(s);
    }
  }
}

function thinkingElement(text, open) {
  const d = document.createElement("details");
  d.className = "thinking";
  d.open = Boolean(open);
  const s = document.createElement("summary");
  s.textContent = open ? "Thinking…" : "Thinking";
  const body = document.createElement("div");
  body.className = "thinking-text";
  body.textContent = text;
  d.append(s, body);
  return d;
}

function toolCard(t) {
  const card = document.createElement("details");
  card.className = "tool";
  card.dataset.tool = t.tool;
  const done = t.result !== undefined && t.result !== null;
  card.dataset.state = done ? (t.success === false ? "failed" : "done") : "running";
  const head = document.createElement("summary");
  const name = document.createElement("span");
  name.className = "tool-name";
  name.textContent = t.tool;
  head.append(name);
  if (t.is_subagent) {
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = "sub-agent";
    head.append(badge);
  }
  const st = document.createElement("span");
  st.className = "tool-state";
  st.textContent = done ? (t.success === false ? "failed" : "done") : "running…";
  head.append(st);
  const args = document.createElement("pre");
  args.className = "tool-args";
  args.textContent = JSON.stringify(t.args ?? {}, null, 2);
  card.append(head, args);
  if (done) {
    const result = document.createElement("pre");
    result.className = "tool-result";
    result.textContent = typeof t.result === "string" ? t.result : JSON.stringify(t.result, null, 2);
    card.append(result);
  }
  return card;
}

function liveAsMessage(live) {
  return {
    role: "assistant",
    content: live.content,
    status: live.status,
    thinking: live.thinking,
    thinkingOpen: !live.thinkingDone && live.status === "running",
    tool_calls: live.tools,
    notes: live.notes,
    note: live.note,
  };
}

let liveElement = null;

function renderMessages() {
  const box = $("#messages");
  box.replaceChildren();
  const all = [...state.history];
  if (state.lastNote && all.length && all[all.length - 1].role === "assistant") {
    all[all.length - 1] = { ...all[all.length - 1], note: state.lastNote };
  }
  if (!all.length && !state.live && !state.pending) {
    const e = document.createElement("div");
    e.id = "empty";
    e.className = "empty";
    e.textContent = state.sid ? "No messages yet." : "Ask something to start a chat.";
    box.append(e);
  }
  for (const msg of all) {
    const m = messageElement(msg.role, msg.status);
    fillMessage(m, msg);
    box.append(m);
  }
  liveElement = null;
  const user = state.live && state.live.user;
  const last = all[all.length - 1];
  if (user && !(last && last.role === "user" && last.content === user.content)) {
    // The user message of the answer streaming, until the history has it.
    const m = messageElement("user");
    fillMessage(m, user);
    box.append(m);
  }
  if (state.live) {
    liveElement = messageElement("assistant", state.live.status);
    fillMessage(liveElement, liveAsMessage(state.live));
    box.append(liveElement);
  }
  if (state.pending) {
    const m = messageElement("user");
    fillMessage(m, state.pending.message);
    box.append(m);
  }
  updateControls();
  scrollDown();
}

let drawScheduled = false;

/** Redraw the live answer at the next frame (many deltas, one redraw) and persist it. */
function drawLive() {
  if (drawScheduled) return;
  drawScheduled = true;
  requestAnimationFrame(() => {
    drawScheduled = false;
    const live = state.live;
    if (!live) return;
    if (liveElement && liveElement.isConnected) {
      // Thinking is open while it streams and folds once it ends; after that the user's
      // choice (the element's own state) is kept across redraws.
      const wasOpen = liveElement.querySelector("details.thinking")?.open;
      fillMessage(liveElement, liveAsMessage(live));
      const d = liveElement.querySelector("details.thinking");
      if (d && wasOpen !== undefined && live.thinkingFolded) d.open = wasOpen;
      if (live.thinkingDone) live.thinkingFolded = true;
    } else {
      renderMessages();
    }
    persistLive();
    updateControls();
    scrollDown();
  });
}

function scrollDown() {
  const box = $("#messages");
  if (box.scrollHeight - box.scrollTop - box.clientHeight < 200) box.scrollTop = box.scrollHeight;
}

function updateControls() {
  const running = Boolean(state.live && !state.live.finished) || Boolean(state.pending);
  $("#stop").hidden = !(state.live && !state.live.finished);
  $("#send").disabled = running;
}

// ---------------------------------------------------------------------------------------
// The live answer, kept in sessionStorage so that a reload resumes it by seq.

function persistLive() {
  const live = state.live;
  if (!state.sid) return;
  if (!live || live.finished) return clearLive(state.sid);
  try {
    sessionStorage.setItem(liveKey(state.sid), JSON.stringify(live));
  } catch {
    // Storage full: a reload resumes from the last state kept, which is just as exact.
  }
}

function clearLive(sid) {
  if (sid) sessionStorage.removeItem(liveKey(sid));
}

function restoreLive(sid) {
  try {
    const saved = JSON.parse(sessionStorage.getItem(liveKey(sid)) || "null");
    if (saved && typeof saved.runId === "string" && Number.isInteger(saved.seq)) state.live = saved;
  } catch {
    clearLive(sid);
  }
}

function newLive(runId) {
  return {
    runId,
    seq: 0,
    content: "",
    thinking: "",
    thinkingDone: false,
    tools: [],
    notes: [],
    status: "running",
    note: "",
    finished: false,
    settledBy: 0,
    user: null,
  };
}

// ---------------------------------------------------------------------------------------
// The WebSocket: connect, resume, backoff, watchdog.

function closeSocket() {
  state.wsGen++;
  clearTimeout(state.retryTimer);
  clearTimeout(state.watchdog);
  if (state.ws) state.ws.close(1000);
  state.ws = null;
  setConnection("idle");
}

function connect() {
  const sid = state.sid;
  if (!sid) return;
  clearTimeout(state.retryTimer);
  const gen = ++state.wsGen;
  const params = new URLSearchParams();
  const token = localStorage.getItem(TOKEN_KEY);
  if (token) params.set("token", token);
  const live = state.live;
  if (live && !live.finished) {
    params.set("run_id", live.runId);
    params.set("after", String(live.seq));
  }
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${scheme}//${location.host}/ws/sessions/${encodeURIComponent(sid)}?${params}`);
  state.ws = ws;
  ws.onopen = () => {
    if (gen !== state.wsGen) return;
    state.retries = 0;
    setConnection("connected");
    armWatchdog();
    for (const w of state.openWaiters.splice(0)) w.resolve(ws);
  };
  ws.onmessage = (ev) => {
    if (gen !== state.wsGen) return;
    let event;
    try {
      event = JSON.parse(ev.data);
    } catch {
      event = {};
    }
    if (event.type === "heartbeat" && state.lastFrameAt) learnHeartbeat(Date.now() - state.lastFrameAt);
    armWatchdog();
    handleEvent(event);
  };
  ws.onclose = (ev) => {
    if (gen !== state.wsGen) return;
    state.ws = null;
    clearTimeout(state.watchdog);
    closed(ev.code, ev.reason);
  };
}

function closed(code, reason) {
  if (code === 4003) {
    setConnection("offline");
    askToken(reason && !/required/i.test(reason) ? `${reason}. Enter a valid token.` : "This server needs a token.").then(
      () => state.sid && connect(),
    );
    return;
  }
  if (code === 4004) return sessionGone();
  if (code === 1008) showNotice(reason || "The server refused the connection.");
  reconnectLater();
}

function reconnectLater() {
  setConnection("reconnecting");
  const base = BACKOFF_MS[Math.min(state.retries, BACKOFF_MS.length - 1)];
  state.retries++;
  clearTimeout(state.retryTimer);
  state.retryTimer = setTimeout(connect, base / 2 + Math.random() * base);
}

/** The longest gap before a heartbeat seen so far is (about) the server's heartbeat period. */
function learnHeartbeat(gapMs) {
  state.heartbeatGapMs = Math.max(state.heartbeatGapMs, gapMs);
  state.watchdogMs = Math.min(WATCHDOG_MS, Math.max(WATCHDOG_MIN_MS, 3 * state.heartbeatGapMs));
}

/** A connection that says nothing, not even a heartbeat, is dead: drop it and reconnect. */
function armWatchdog() {
  const now = Date.now();
  clearTimeout(state.watchdog);
  const ws = state.ws;
  state.watchdog = setTimeout(() => {
    if (ws === state.ws && ws) {
      state.wsGen++; // its close event comes late or never: forget it now
      ws.close();
      state.ws = null;
      reconnectLater();
    }
  }, state.watchdogMs);
  state.lastFrameAt = now;
}

function whenOpen() {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) return Promise.resolve(state.ws);
  return new Promise((resolve, reject) => {
    const waiter = { resolve, reject };
    state.openWaiters.push(waiter);
    setTimeout(() => {
      const i = state.openWaiters.indexOf(waiter);
      if (i >= 0) {
        state.openWaiters.splice(i, 1);
        reject(new Error("The server cannot be reached."));
      }
    }, 30000);
  });
}

// ---------------------------------------------------------------------------------------
// Events.

function handleEvent(e) {
  switch (e.type) {
    case "heartbeat":
      return;
    case "session_sync":
      return sessionSync();
    case "replay_start":
    case "replay_end":
      return;
    case "error":
      if (e.seq === undefined) return clientError(e.message);
      break;
    case "stream_start":
      return streamStart(e);
    default:
      break;
  }
  const live = state.live;
  if (!live || live.finished || typeof e.seq !== "number" || e.seq <= live.seq) return;
  live.seq = e.seq;
  switch (e.type) {
    case "thinking_delta":
      live.thinking += e.delta;
      break;
    case "thinking_end":
      live.thinkingDone = true;
      break;
    case "stream_delta":
      live.content += e.delta;
      break;
    case "tool_started":
      live.tools.push({ tool: e.tool, args: e.args, is_subagent: Boolean(e.is_subagent) });
      break;
    case "tool_call": {
      const open = live.tools.find((t) => t.tool === e.tool && (t.result === undefined || t.result === null));
      const done = { tool: e.tool, args: e.args, result: e.result, success: e.success, is_subagent: Boolean(e.is_subagent) };
      if (open) Object.assign(open, done);
      else live.tools.push(done);
      break;
    }
    case "context_compressed":
      live.notes.push("Earlier messages were summarised to fit the model's context.");
      break;
    case "stream_end":
      live.content = e.content;
      finish(live, "complete", "");
      break;
    case "stream_stopped":
      live.content = e.content;
      if (e.reason === "shutdown") finish(live, "interrupted", "the server was restarting");
      else if (e.reason === "deleted") finish(live, "stopped", "the chat was deleted");
      else finish(live, "stopped", "");
      break;
    case "error":
      finish(live, "error", e.message);
      break;
    default:
      break;
  }
  drawLive();
}

function finish(live, status, note) {
  live.status = status;
  live.note = note;
  settle(live);
}

/** The answer has ended: keep drawing it until a history load begun from now on has it. */
function settle(live) {
  live.finished = true;
  live.thinkingDone = true;
  live.settledBy = state.historyLoads;
  clearLive(state.sid);
  loadHistory();
}

function streamStart(e) {
  if (state.live && state.live.runId === e.run_id) return; // a resume starts with it again
  const mine = Boolean(state.pending);
  const old = state.live;
  if (old && old.finished) {
    const last = state.history[state.history.length - 1];
    if (old.user && !(last && last.role === "user" && last.content === old.user.content)) state.history.push(old.user);
    state.history.push({ ...liveAsMessage(old), thinkingOpen: false });
  }
  state.live = newLive(e.run_id);
  state.live.seq = e.seq ?? 1;
  if (mine) {
    state.live.user = state.pending.message;
    state.pending = null;
  }
  state.lastNote = null;
  renderMessages();
  persistLive();
  // A run started elsewhere (another tab): its user message is in the history.
  if (!mine) loadHistory();
}

function sessionSync() {
  // The answer we were following ended while we were away: the history has it.
  const live = state.live;
  if (live && !live.finished) settle(live);
  else loadHistory();
}

function clientError(message) {
  if (message === "No active run to stop.") return; // a stop that came as the answer ended
  showNotice(message);
  if (state.pending) {
    const ta = $("#composer textarea");
    if (!ta.value) ta.value = state.pending.message.content;
    state.pending = null;
    renderMessages();
  }
}

// ---------------------------------------------------------------------------------------
// Sending, stopping, attachments.

async function send() {
  const ta = $("#composer textarea");
  const content = ta.value;
  if (!content.trim() || state.pending || (state.live && !state.live.finished)) return;
  let ws;
  try {
    await ensureSession(content);
    ws = await whenOpen();
  } catch (err) {
    return showNotice(`Could not send: ${err.message}`);
  }
  const msg = { type: "message", content };
  if (state.images.length) msg.images = [...state.images];
  if (state.files.length) msg.files = state.files.map(({ name, path }) => ({ name, path }));
  state.pending = { message: { role: "user", content, images: msg.images, files: msg.files } };
  ws.send(JSON.stringify(msg));
  ta.value = "";
  state.images = [];
  state.files = [];
  renderAttachments();
  renderMessages();
  autoSize();
}

async function stop() {
  const ws = state.ws;
  if (ws && ws.readyState === WebSocket.OPEN) return ws.send(JSON.stringify({ type: "stop" }));
  try {
    await api("POST", `/sessions/${encodeURIComponent(state.sid)}/stop`);
  } catch (err) {
    showNotice(`Could not stop: ${err.message}`);
  }
}

function imageBytes(images) {
  return images.reduce((n, url) => n + (url.length - url.indexOf(",") - 1), 0);
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
}

async function addImages(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) continue;
    if (state.images.length >= MAX_IMAGES) {
      showNotice(`At most ${MAX_IMAGES} images per message.`);
      break;
    }
    const url = await readAsDataUrl(file);
    if (imageBytes([...state.images, url]) > MAX_IMAGE_BYTES) {
      showNotice("Images over 50 MB in total cannot be sent in one message.");
      break;
    }
    state.images.push(url);
  }
  renderAttachments();
}

async function uploadFiles(files) {
  for (const file of files) {
    try {
      const sid = await ensureSession(file.name);
      const saved = await api("POST", `/sessions/${encodeURIComponent(sid)}/files?name=${encodeURIComponent(file.name)}`, file, "application/octet-stream");
      state.files.push(saved);
    } catch (err) {
      showNotice(`Could not upload ${file.name}: ${err.message}`);
    }
  }
  renderAttachments();
}

function renderAttachments() {
  const box = $("#attachments");
  box.replaceChildren();
  state.images.forEach((src, i) => {
    const chip = document.createElement("span");
    chip.className = "chip image";
    const img = document.createElement("img");
    img.src = src;
    img.alt = `image ${i + 1}`;
    chip.append(img, removeButton(() => state.images.splice(i, 1)));
    box.append(chip);
  });
  state.files.forEach((f, i) => {
    const chip = document.createElement("span");
    chip.className = "chip file";
    chip.dataset.name = f.name;
    chip.append(document.createTextNode(f.name), removeButton(() => state.files.splice(i, 1)));
    box.append(chip);
  });
  box.hidden = !state.images.length && !state.files.length;
}

function removeButton(remove) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = "remove";
  b.title = "Remove";
  b.textContent = "×";
  b.onclick = () => {
    remove();
    renderAttachments();
  };
  return b;
}

function autoSize() {
  const ta = $("#composer textarea");
  ta.style.height = "auto";
  ta.style.height = `${Math.min(ta.scrollHeight, 240)}px`;
}

// ---------------------------------------------------------------------------------------
// Start.

function start() {
  const form = $("#composer");
  const ta = form.querySelector("textarea");
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    send();
  });
  ta.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      send();
    }
  });
  ta.addEventListener("input", autoSize);
  ta.addEventListener("paste", (ev) => {
    const files = [...(ev.clipboardData?.files || [])].filter((f) => f.type.startsWith("image/"));
    if (files.length) {
      ev.preventDefault();
      addImages(files);
    }
  });
  $("#stop").addEventListener("click", stop);
  $("#new-chat").addEventListener("click", () => {
    if (location.hash) location.hash = "";
    else openSession(null);
    ta.focus();
  });
  $("#file-input").addEventListener("change", (ev) => {
    uploadFiles([...ev.target.files]);
    ev.target.value = "";
  });
  $("#image-input").addEventListener("change", (ev) => {
    addImages([...ev.target.files]);
    ev.target.value = "";
  });
  window.addEventListener("hashchange", () => {
    const sid = sessionFromHash();
    if (sid !== state.sid) openSession(sid);
  });
  window.addEventListener("online", () => state.sid && !state.ws && connect());
  window.addEventListener("pagehide", persistLive);
  document.addEventListener("visibilitychange", () => document.visibilityState === "visible" && loadSessions());
  loadSessions().then(() => openSession(sessionFromHash()));
  ta.focus();
}

start();
