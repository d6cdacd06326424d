// The halfmq console: a single-page application over the admin API (served by the broker,
// no external assets). Pages are hash routes; every value goes into the page as text.
"use strict";

const BOOT = JSON.parse(document.getElementById("boot").textContent);
const PAGES = [["overview", "Overview"], ["topics", "Topics"], ["groups", "Groups"], ["messages", "Messages"],
               ["dlq", "Dead letters"], ["transactions", "Transactions"], ["clients", "Clients"]];
let refreshTimer = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c != null) node.append(c instanceof Node ? c : String(c));
  return node;
}

function when(ms) {
  if (ms == null) return "-";
  const d = new Date(ms);
  return d.toISOString().replace("T", " ").replace("Z", "");
}

function fmt(v) {
  if (v == null) return "-";
  if (typeof v === "boolean") return v ? "yes" : "no";
  if (typeof v === "number") return Number.isInteger(v) ? v.toLocaleString("en-US") : v.toFixed(1);
  if (Array.isArray(v)) return v.join(", ") || "-";
  return String(v);
}

async function api(path, options) {
  const resp = await fetch(path, {credentials: "same-origin", ...(options || {})});
  if (resp.status === 401) { location.href = "/console/login"; throw new Error("login needed"); }
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  if (!resp.ok) throw new Error((body && body.error) || `HTTP ${resp.status}`);
  return body;
}

function post(path, body) {
  return api(path, {method: "POST", body: JSON.stringify(body || {}),
                    headers: {"Content-Type": "application/json", "X-CSRF-Token": BOOT.csrf}});
}

function toast(text, bad) {
  document.querySelectorAll(".toast").forEach((old) => old.remove());
  const t = el("div", {class: bad ? "toast bad" : "toast", role: "status"}, text);
  document.body.append(t);
  setTimeout(() => t.remove(), 4000);
}

// A confirmation step for every state change: resolves true only on "confirm".
function confirmStep(title, lines, confirmLabel, danger) {
  return new Promise((resolve) => {
    const close = (answer) => { overlay.remove(); resolve(answer); };
    const overlay = el("div", {class: "overlay"},
      el("div", {class: "dialog", role: "dialog", "aria-modal": "true", "aria-label": title},
        el("h2", {}, title), ...lines.map((l) => el("p", {}, l)),
        el("div", {class: "actions"},
          el("button", {onclick: () => close(false)}, "Cancel"),
          el("button", {class: danger ? "danger" : "primary", onclick: () => close(true)}, confirmLabel))));
    document.body.append(overlay);
  });
}

// rows: list of objects; columns: [header, (row) => value | Node, numeric?]
function table(rows, columns, empty) {
  if (!rows.length) return el("p", {class: "empty"}, empty);
  return el("table", {},
    el("thead", {}, el("tr", {}, columns.map(([h]) => el("th", {}, h)))),
    el("tbody", {}, rows.map((r) => el("tr", {}, columns.map(([, get, kind]) => {
      const v = get(r);
      return el("td", {class: kind || (typeof v === "number" ? "n" : null)}, v instanceof Node ? v : fmt(v));
    })))));
}

function badge(text, kind) { return el("span", {class: `badge ${kind || ""}`}, text); }

// -- pages ------------------------------------------------------------------------------

const CHARTS = [["in", "Messages in per topic (per second)", ""], ["out", "Messages out per topic (deliveries per second)", ""],
                ["lag", "Lag per consumer group (messages)", ""], ["tx", "Transaction outcomes (per second)", ""],
                ["fsync", "fsync latency (ms)", "ms"]];

async function overview(root) {
  const cards = CHARTS.map(([kind, title, unit]) => {
    const canvas = el("canvas", {class: "chart", "data-kind": kind});
    const legend = el("div", {class: "legend"});
    return {kind, unit, canvas, legend, card: el("section", {class: "card"}, el("h3", {}, title), canvas, legend)};
  });
  root.append(el("h2", {}, "Overview: the last hour"), el("div", {class: "charts"}, cards.map((c) => c.card)));
  const draw = async () => {
    const data = await api("/api/series");
    for (const c of cards) {
      const picked = {};
      for (const [name, values] of Object.entries(data.series)) {
        if (name.startsWith(c.kind + "/")) picked[name.slice(c.kind.length + 1)] = values;
      }
      window.drawChart(c.canvas, c.legend, data.t, picked, c.unit);
    }
  };
  await draw();
  refreshTimer = setInterval(() => draw().catch(() => {}), 2000);
}

async function topics(root) {
  const [t, s] = await Promise.all([api("/api/topics?limit=1000"), api("/api/scheduled?limit=20")]);
  root.append(el("h2", {}, `Topics (${t.topics.length})`),
    table(t.topics, [["topic", (r) => r.topic], ["queues", (r) => r.queues.length], ["messages", (r) => r.messages],
                     ["scheduled", (r) => r.scheduled], ["next due (UTC)", (r) => when(r.next_due)],
                     ["queue offsets", (r) => r.queues.map((q) => `${q.queue_id}: ${q.min_offset}-${q.max_offset}`).join("  "), "mono"]],
          "No topics yet."),
    el("h3", {}, `Scheduled messages (${s.scheduled})`),
    table(s.next, [["msg_id", (r) => r.msg_id, "id"], ["topic", (r) => r.topic], ["deliver at (UTC)", (r) => when(r.deliver_at)],
                   ["transactional", (r) => r.transactional]], "Nothing scheduled."));
}

async function groups(root) {
  const g = await api("/api/groups?limit=1000");
  const details = await Promise.all(g.groups.slice(0, 100).map(async (grp) => {
    const [settings, members] = await Promise.all([api(`/api/groups/${encodeURIComponent(grp.group)}/settings`),
                                                   api(`/api/groups/${encodeURIComponent(grp.group)}/members`)]);
    return {settings, members: members.members};
  }));
  root.append(el("h2", {}, `Consumer groups (${g.groups.length})`));
  if (!g.groups.length) { root.append(el("p", {class: "empty"}, "No consumer groups yet.")); return; }
  g.groups.forEach((grp, i) => {
    const d = details[i] || {settings: {}, members: []};
    root.append(el("section", {class: "card", "data-group": grp.group},
      el("h3", {}, grp.group, " ", d.settings.fifo ? badge("FIFO", "info") : null),
      table([grp], [["topics", (r) => r.topics], ["members", (r) => r.members], ["delivered", (r) => r.delivered],
                    ["acked", (r) => r.acked], ["lag", (r) => r.lag], ["in flight", (r) => r.in_flight],
                    ["retrying", (r) => r.waiting_retry], ["dead letters", (r) => r.dead_lettered],
                    ["FIFO", () => Boolean(d.settings.fifo)], ["max attempts", () => d.settings.max_attempts || "per subscription"],
                    ["retry delays s", () => d.settings.retry_delays || "broker default"]], ""),
      el("h3", {}, "Members"),
      table(d.members, [["client id", (m) => m.client_id, "id"], ["address", (m) => m.address], ["kind", (m) => m.kind],
                        ["version", (m) => m.version == null ? null : `protocol ${m.version}`], ["client", (m) => m.agent],
                        ["topic", (m) => m.topic], ["tags", (m) => m.tags], ["leases", (m) => m.leases]],
            "No member connected.")));
  });
}

const EVENT_KIND = {acked: "ok", committed: "ok", failed: "bad", expired: "bad", dead_lettered: "bad", rolled_back: "bad",
                    abandoned: "bad", retry: "warn", resent: "warn", released: "ok"};
const SKIP = new Set(["at", "event", "group"]);

function timeline(trace) {
  const items = trace.events.map((e) => {
    const detail = Object.entries(e).filter(([k, v]) => !SKIP.has(k) && v != null)
      .map(([k, v]) => `${k}=${["due", "deliver_at", "born"].includes(k) ? when(v) : fmt(v)}`).join("  ");
    return el("li", {class: EVENT_KIND[e.event] || null, "data-event": e.event},
      el("span", {class: "when"}, when(e.at)), el("span", {class: "ev"}, e.event),
      e.group ? badge(e.group, "info") : null, " ", el("span", {class: "detail"}, detail));
  });
  const states = Object.entries(trace.groups || {});
  return el("section", {class: "card", id: "trace"},
    el("h3", {}, "Trace of ", el("span", {class: "mono"}, trace.msg_id), ` (topic ${trace.topic}, keys ${fmt(trace.keys)})`),
    trace.trace ? null : el("p", {class: "note"}, "Delivery attempts are recorded when the broker runs with --trace."),
    el("ol", {class: "timeline"}, items),
    el("h3", {}, "Now, per group"),
    table(states.map(([group, st]) => ({group, ...st})),
          [["group", (r) => r.group], ["state", (r) => badge(r.state, EVENT_KIND[r.state] || "")], ["deliveries", (r) => r.deliveries]],
          "No consumer group reads its topic."));
}

async function messages(root, params) {
  const id = el("input", {name: "id", placeholder: "message id", size: 28, value: params.get("id") || ""});
  const topic = el("input", {name: "topic", placeholder: "topic", value: params.get("topic") || ""});
  const key = el("input", {name: "key", placeholder: "key", value: params.get("key") || ""});
  const out = el("div", {});
  const search = (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams();
    if (id.value.trim()) q.set("id", id.value.trim());
    else { q.set("topic", topic.value.trim()); q.set("key", key.value.trim()); }
    location.hash = `#/messages?${q}`;
  };
  root.append(el("h2", {}, "Messages"),
    el("form", {class: "inline card", onsubmit: search},
      el("label", {}, "By id", id), el("span", {class: "note"}, "or"), el("label", {}, "Topic", topic),
      el("label", {}, "Key", key), el("button", {class: "primary", type: "submit"}, "Search")), out);
  if (params.get("id")) {
    out.append(timeline(await api(`/api/messages/${encodeURIComponent(params.get("id"))}/trace`)));
  } else if (params.get("topic") && params.get("key")) {
    const found = await api(`/api/messages?${new URLSearchParams({topic: params.get("topic"), key: params.get("key")})}`);
    out.append(el("h3", {}, `${found.messages.length} message(s) carrying key ${params.get("key")}`),
      table(found.messages, [["msg_id", (m) => el("a", {href: `#/messages?id=${m.msg_id}`, class: "mono"}, m.msg_id)],
                             ["queue", (m) => m.queue_id], ["offset", (m) => m.queue_offset], ["keys", (m) => m.keys],
                             ["tags", (m) => m.tags], ["stored (UTC)", (m) => when(m.store_timestamp)],
                             ["body", (m) => (m.body == null ? `(binary, ${m.body_size} bytes)` : m.body.slice(0, 80))]],
            "No message of that topic carries this key."));
    if (found.messages.length === 1) {
      out.append(timeline(await api(`/api/messages/${encodeURIComponent(found.messages[0].msg_id)}/trace`)));
    }
  }
}

async function dlq(root, params) {
  const g = await api("/api/groups?limit=1000");
  const names = g.groups.map((x) => x.group);
  const chosen = params.get("group") || (g.groups.find((x) => x.dead_lettered > 0) || g.groups[0] || {}).group;
  const select = el("select", {name: "group", onchange: (ev) => { location.hash = `#/dlq?group=${encodeURIComponent(ev.target.value)}`; }},
    names.map((n) => el("option", {value: n, selected: n === chosen}, `${n} (${g.groups.find((x) => x.group === n).dead_lettered})`)));
  root.append(el("h2", {}, "Dead letters"), el("form", {class: "inline card"}, el("label", {}, "Consumer group", select)));
  if (!chosen) { root.append(el("p", {class: "empty"}, "No consumer groups yet.")); return; }
  const found = await api(`/api/dlq/${encodeURIComponent(chosen)}/messages?limit=1000`);
  const resend = async (m) => {
    const ok = await confirmStep("Resend this message?", [`${m.msg_id} goes back to topic ${m.topic} for group ${chosen} only.`,
                                                          "Its consumers receive it again."], "Resend");
    if (!ok) return;
    try {
      await post(`/api/dlq/${encodeURIComponent(chosen)}/messages/${encodeURIComponent(m.msg_id)}/resend`);
      toast(`Resent ${m.msg_id} to ${chosen}`);
    } catch (e) { toast(e.message, true); }
  };
  root.append(table(found.messages, [
    ["msg_id", (m) => el("a", {href: `#/messages?id=${m.msg_id}`, class: "mono"}, m.msg_id)], ["topic", (m) => m.topic],
    ["keys", (m) => m.keys], ["tags", (m) => m.tags], ["dead since (UTC)", (m) => when(m.dead_lettered_at)],
    ["body", (m) => (m.body == null ? `(binary, ${m.body_size} bytes)` : m.body.slice(0, 80))],
    ["", (m) => (BOOT.admin ? el("button", {onclick: () => resend(m), "data-msg": m.msg_id}, "Resend") : null)]],
  `No dead letters in ${chosen}.`));
}

async function transactions(root, params) {
  const state = params.get("state") || "prepared";
  const tabs = ["prepared", "abandoned", "committed", "rolled_back"].map((s) =>
    el("button", {class: s === state ? "active" : null, onclick: () => { location.hash = `#/transactions?state=${s}`; }},
       s.replace("_", " ")));
  const found = await api(`/api/transactions?state=${state}&limit=1000`);
  const act = async (t, verb) => {
    const lines = verb === "commit"
      ? [`${t.msg_id} (topic ${t.topic}, keys ${fmt(t.keys)}) becomes visible: its consumers receive it.`]
      : [`${t.msg_id} (topic ${t.topic}, keys ${fmt(t.keys)}) is dropped: no consumer will ever receive it.`];
    lines.push("The producer's own answer, if it comes later, cannot change this outcome.");
    const ok = await confirmStep(`${verb === "commit" ? "Commit" : "Roll back"} this transaction?`, lines,
                                 verb === "commit" ? "Commit" : "Roll back", verb !== "commit");
    if (!ok) return;
    try {
      await post(`/api/transactions/${encodeURIComponent(t.msg_id)}/${verb}`);
      toast(`${t.msg_id}: ${verb === "commit" ? "committed" : "rolled back"}`);
      route();
    } catch (e) { toast(e.message, true); }
  };
  const open = state === "prepared" || state === "abandoned";
  root.append(el("h2", {}, "Transactions"), el("div", {class: "tabs"}, tabs),
    el("p", {class: "note"}, state === "abandoned"
      ? "Abandoned: no producer answered the check-backs; never delivered unless committed here."
      : "Half messages by state; prepared and abandoned ones can be committed or rolled back by hand."),
    table(found.transactions, [
      ["msg_id", (t) => el("a", {href: `#/messages?id=${t.msg_id}`, class: "mono"}, t.msg_id)], ["topic", (t) => t.topic],
      ["keys", (t) => t.keys], ["producer group", (t) => t.group], ["producer", (t) => t.producer_id, "id"],
      ["age s", (t) => t.age], ["checks", (t) => t.checks],
      ["next check in s", (t) => (t.next_check_at == null ? null : Math.max(0, t.next_check_at - Date.now() / 1000))],
      ["", (t) => (open && BOOT.admin ? el("span", {},
        el("button", {class: "primary", onclick: () => act(t, "commit"), "data-commit": t.msg_id}, "Commit"), " ",
        el("button", {onclick: () => act(t, "rollback"), "data-rollback": t.msg_id}, "Roll back")) : null)]],
    `No ${state.replace("_", " ")} transactions.`));
}

async function clients(root) {
  const c = await api("/api/clients");
  root.append(el("h2", {}, `Connected clients (${c.clients.length})`),
    table(c.clients, [["client id", (r) => r.client_id, "id"], ["role", (r) => r.role], ["group", (r) => r.group],
                      ["address", (r) => r.address], ["version", (r) => r.version == null ? null : `protocol ${r.version}`],
                      ["client", (r) => r.agent], ["topic", (r) => r.topic], ["since (UTC)", (r) => when(r.since)]],
          "No client connected."));
}

const HANDLERS = {overview, topics, groups, messages, dlq, transactions, clients};

async function route() {
  if (refreshTimer) { clearInterval(refreshTimer); refreshTimer = null; }
  const [path, query] = (location.hash.replace(/^#\/?/, "") || "overview").split("?");
  const page = HANDLERS[path] ? path : "overview";
  document.querySelectorAll("header nav a").forEach((a) => a.classList.toggle("active", a.dataset.page === page));
  const fresh = el("main", {"data-page": page});
  document.querySelector("main").replaceWith(fresh);  // in the document first: charts need its layout
  try {
    await HANDLERS[page](fresh, new URLSearchParams(query || ""));
  } catch (e) {
    fresh.append(el("p", {class: "error"}, `Could not load: ${e.message}`));
  }
}

function start() {
  const who = BOOT.open ? el("span", {class: "who"}, "open broker (no users)")
    : el("span", {class: "who"}, `${BOOT.user || "?"} (${BOOT.admin ? "admin" : "read only"})`,
        el("button", {onclick: async () => { await post("/console/logout"); location.href = "/console/login"; }}, "Log out"));
  document.body.append(
    el("header", {}, el("h1", {}, document.title),
      el("nav", {}, PAGES.map(([p, label]) => el("a", {href: `#/${p}`, "data-page": p}, label))), who),
    el("main", {}));
  window.addEventListener("hashchange", route);
  route();
}

start();
