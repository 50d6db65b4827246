// The Bulwark console: renders the view /api/stream pushes (server-sent events) each
// time the cluster changes. Every name goes into the page as text (textContent), never
// as HTML, so an IQN or volume name with markup in it shows as typed.
"use strict";

const $ = (sel) => document.querySelector(sel);

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function row(cells, attrs) {
  const tr = document.createElement("tr");
  for (const [k, v] of Object.entries(attrs || {})) tr.setAttribute(k, v);
  for (const c of cells) {
    const td = c instanceof Node ? wrap(c) : el("td", c);
    tr.appendChild(td);
  }
  return tr;
}

function wrap(node) {
  if (node.tagName === "TD") return node;
  const td = document.createElement("td");
  td.appendChild(node);
  return td;
}

function fill(tableSel, rows, empty) {
  const tbody = $(tableSel + " tbody");
  tbody.replaceChildren(...rows);
  if (rows.length === 0) {
    const tr = document.createElement("tr");
    const td = el("td", empty);
    td.colSpan = 9;
    tr.appendChild(td);
    tbody.appendChild(tr);
  }
}

function human(bytes) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  let v = bytes;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i === 0 ? v : v.toFixed(1)) + " " + units[i];
}

function duration(seconds) {
  if (seconds < 60) return Math.round(seconds) + " s";
  if (seconds < 3600) return Math.round(seconds / 60) + " min";
  return (seconds / 3600).toFixed(1) + " h";
}

const REGION = 1 << 20;
let view = null;

function nodeName(id) {
  const n = view.state.nodes[String(id)];
  return n ? n.name : "#" + id;
}

function statusOf(id) {
  const r = view.nodes[String(id)];
  return r && r.Ok ? r.Ok : null;
}

function leaderId() {
  let best = null;
  for (const r of Object.values(view.nodes)) {
    if (!r.Ok || r.Ok.raft.leader == null) continue;
    if (!best || r.Ok.raft.term > best.term) best = { id: r.Ok.raft.leader, term: r.Ok.raft.term };
  }
  return best ? best.id : null;
}

function renderNodes() {
  const leader = leaderId();
  const me = Object.values(view.nodes).map((r) => r.Ok).find((s) => s && s.name === view.me);
  const rows = [];
  for (const n of Object.values(view.state.nodes)) {
    const st = statusOf(n.id);
    const seen = me ? me.peers.find((p) => p.node === n.id) : null;
    const raft = st ? (n.id === leader && st.raft.state !== "Leader" ? st.raft.state + " (leader)" : st.raft.state) : "unreachable";
    const nets = el("span");
    if (seen) {
      seen.networks.forEach((up, i) => {
        nets.appendChild(el("span", (i ? " " : "") + "net" + i + (up ? " up" : " down"), up ? "ok" : "bad"));
      });
    } else {
      nets.appendChild(el("span", st ? "up" : "down", st ? "ok" : "bad"));
    }
    const addrs = [n.addresses.control].concat(n.addresses.portals).join(", ");
    const role = n.role + (n.drained ? (n.evacuate ? ", drained, evacuating" : ", drained") : "") +
      (n.zone ? ", zone " + n.zone : "");
    const tr = row([n.name, role, raft, nets, addrs], { "data-node": n.name });
    if (!st) tr.cells[2].className = "bad";
    if (n.id === leader) tr.cells[2].className = "ok";
    rows.push(tr);
  }
  fill("#nodes", rows, "no nodes");
}

function primaryView(v) {
  const st = statusOf(v.primary);
  return st ? (st.volumes || []).find((x) => x.name === v.name && x.role === "primary") : null;
}

function renderVolumes() {
  const rows = [];
  for (const v of Object.values(view.state.volumes)) {
    const pv = primaryView(v);
    const inSync = v.in_sync.length + "/" + v.replicas.length;
    const syncCell = el("td", inSync + " (" + v.in_sync.map(nodeName).join(", ") + ")",
      v.in_sync.length < v.replicas.length ? "warn" : "ok");
    const resync = el("td");
    for (const r of (pv && pv.resyncs) || []) {
      const total = r.done_regions + r.pending_regions;
      const pct = total ? (100 * r.done_regions) / total : 100;
      const bar = el("span", null, "bar");
      const fillBar = el("span");
      fillBar.style.width = pct.toFixed(0) + "%";
      bar.appendChild(fillBar);
      const left = r.rate_bytes_per_s > 0
        ? ", " + duration((r.pending_regions * REGION) / r.rate_bytes_per_s) + " left"
        : (r.connected ? "" : ", waiting for the replica");
      const line = el("div");
      line.className = "resync";
      const rebuild = (v.joining || []).some((j) => j.node === r.node);
      line.appendChild(el("span", (rebuild ? "rebuild to " : "resync to ") + nodeName(r.node) + " "));
      line.appendChild(bar);
      line.appendChild(el("span", " " + pct.toFixed(0) + "% at " + human(r.rate_bytes_per_s) + "/s" + left));
      resync.appendChild(line);
    }
    if (!resync.firstChild) resync.textContent = "—";
    const f = v.last_failover;
    const failover = f
      ? (f.planned ? "move " : "failover ") + nodeName(f.from) + " → " + nodeName(f.to) +
        (f.pause_ms != null ? ", pause " + f.pause_ms + " ms" : "") +
        " at " + new Date(f.io_stopped_unix_ms).toLocaleTimeString()
      : "—";
    let verify = "—";
    if (pv && pv.verify && !pv.verify.finished) {
      verify = "running " + pv.verify.compared + "/" + pv.verify.regions;
    } else if (v.verify && v.verify.result) {
      const differing = v.verify.result.replicas.reduce((a, r) => a + r.differing, 0);
      verify = differing ? differing + " regions differ" : "identical";
    }
    const actions = el("td");
    const target = el("select");
    target.setAttribute("aria-label", "move " + v.name + " to");
    for (const id of v.in_sync) {
      if (id === v.primary) continue;
      const o = el("option", nodeName(id));
      o.value = nodeName(id);
      target.appendChild(o);
    }
    const move = el("button", "Move");
    move.className = "move";
    move.disabled = target.options.length === 0;
    move.addEventListener("click", () => {
      const to = target.value;
      if (to && confirm("Move volume " + v.name + " (and the rest of its target) to " + to + "?")) {
        act("/api/volumes/" + encodeURIComponent(v.name) + "/move", { to });
      }
    });
    const check = el("button", "Verify");
    check.className = "verify";
    check.addEventListener("click", () => {
      if (confirm("Start an online verify of " + v.name + "?")) {
        act("/api/volumes/" + encodeURIComponent(v.name) + "/verify", {});
      }
    });
    if (canAct) {
      actions.append(target, move, check);
    } else {
      actions.textContent = "read-only";
    }
    const primary = el("td", nodeName(v.primary) + (v.moving_to != null ? " → " + nodeName(v.moving_to) : ""), "primary");
    rows.push(row([
      v.name, human(v.size_bytes), primary, v.replicas.map(nodeName).join(", "),
      syncCell, resync, failover, verify, actions,
    ], { "data-volume": v.name }));
  }
  fill("#volumes", rows, "no volumes (bulwark volume create)");
}

function renderSnapshots() {
  const rows = [];
  for (const v of Object.values(view.state.volumes)) {
    for (const [name, s] of Object.entries(v.snapshots || {})) {
      const state = s.ready ? "taken" : "being taken";
      const pause = s.pause_us != null ? (s.pause_us / 1000).toFixed(1) + " ms" : "—";
      rows.push(row([
        v.name, name, human(s.size_bytes), el("td", state, s.ready ? "ok" : "warn"), pause,
        (s.members || []).map(nodeName).join(", ") || "—",
        new Date(s.created_ms).toLocaleString(),
      ], { "data-snapshot": v.name + "@" + name }));
    }
    if (v.rollback) {
      rows.push(row([v.name, v.rollback.snapshot, "—", el("td", "rolling back", "warn"), "—", "—", "—"]));
    }
  }
  fill("#snapshots", rows, "no snapshots (bulwark snapshot create)");
}

function renderTargets() {
  const rows = [];
  const sessions = [];
  for (const r of Object.values(view.nodes)) {
    if (!r.Ok) continue;
    for (const s of r.Ok.sessions) sessions.push({ node: r.Ok.name, ...s });
  }
  for (const t of Object.values(view.state.targets)) {
    const luns = Object.entries(t.luns)
      .map(([l, v]) => "LUN " + l + ": " + v + (v.includes("@") ? " (snapshot, read-only)" : ""))
      .join(", ") || "none";
    const paths = el("td");
    for (const p of (view.paths[t.iqn] || [])) {
      const cls = p.state === "active/optimized" ? "ok" : (p.state === "unavailable" ? "bad" : "");
      paths.appendChild(el("div", (p.node || "?") + " " + (p.portals || []).join(",") + " " + p.state, cls));
    }
    const who = sessions.filter((s) => s.target === t.iqn)
      .map((s) => s.initiator + " (" + s.peer + " via " + s.node + ")");
    rows.push(row([t.iqn, luns, paths, who.join("; ") || "none"], { "data-target": t.iqn }));
  }
  fill("#targets", rows, "no targets (bulwark target create)");
}

function renderEvents() {
  const all = [];
  for (const r of Object.values(view.nodes)) if (r.Ok) all.push(...r.Ok.events);
  all.sort((a, b) => b.unix_ms - a.unix_ms);
  const rows = all.slice(0, 40).map((e) => {
    const tr = row([new Date(e.unix_ms).toLocaleTimeString(), e.observer, e.kind, e.message]);
    tr.cells[3].className = "msg";
    return tr;
  });
  fill("#events", rows, "no events yet");
}

function render() {
  $("#cluster").textContent = "via " + view.me + ", " + Object.keys(view.state.nodes).length + " nodes";
  renderNodes();
  renderVolumes();
  renderSnapshots();
  renderTargets();
  renderEvents();
}

async function act(url, body) {
  const msg = $("#message");
  msg.textContent = "…";
  try {
    const r = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Bulwark-Console": "1" },
      body: JSON.stringify(body),
    });
    const j = await r.json().catch(() => ({}));
    msg.textContent = r.ok ? "done" : "refused: " + (j.error || r.status);
    msg.className = r.ok ? "ok" : "bad";
  } catch (e) {
    msg.textContent = "failed: " + e;
    msg.className = "bad";
  }
}

// Actions are shown only to a role that may use them (admin); a viewer's console reads.
let canAct = false;

async function whoami() {
  try {
    const r = await fetch("/api/whoami");
    const j = await r.json();
    canAct = j.role === "admin";
    $("#role").textContent = j.role ? "signed in as " + j.role + (j.token ? " (token " + j.token + ")" : "") : "";
  } catch (e) {
    canAct = false;
  }
}

function connect() {
  const live = $("#live");
  const source = new EventSource("/api/stream");
  source.addEventListener("status", (ev) => {
    // Skip a redraw while the administrator picks a move target.
    if (document.activeElement && document.activeElement.tagName === "SELECT") return;
    view = JSON.parse(ev.data);
    live.textContent = "live " + new Date().toLocaleTimeString();
    live.className = "";
    render();
  });
  source.onerror = () => {
    live.textContent = "reconnecting…";
    live.className = "stale";
  };
}

whoami().then(connect);
