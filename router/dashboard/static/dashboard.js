// The fleet page: polls /dashboard/state every second and redraws in place (no page reload).
// Text from the fleet (replica ids, key names) is only ever set as textContent, never as HTML.
// Actions POST with the session's CSRF token in a header, after a confirmation dialog.
"use strict";

(() => {
  const POLL_MS = 1000;
  const COLORS = ["#60a5fa", "#4ade80", "#fbbf24", "#f472b6", "#a78bfa", "#2dd4bf", "#fb923c"];
  const $ = (id) => document.getElementById(id);
  let csrf = null;
  const plots = { ttft: null, tokens: null, tokensIds: "" };

  // -- formatting

  const num = (x, digits = 0) =>
    x === null || x === undefined ? "–" : Number(x).toLocaleString(undefined, {
      minimumFractionDigits: digits, maximumFractionDigits: digits });
  const pct = (x) => (x === null || x === undefined ? "–" : `${(x * 100).toFixed(1)}%`);
  const usage = (u) => (u.limit === null ? `${num(u.used)}` : `${num(u.used)} / ${num(u.limit)}`);
  const clock = (t) => new Date(t * 1000).toLocaleTimeString();
  function duration(s) {
    if (s < 120) return `${Math.round(s)} s`;
    if (s < 7200) return `${Math.round(s / 60)} min`;
    return `${(s / 3600).toFixed(1)} h`;
  }

  function cell(row, index) {
    while (row.cells.length <= index) row.insertCell();
    return row.cells[index];
  }

  function setText(row, index, text, className) {
    const c = cell(row, index);
    if (c.textContent !== text) c.textContent = text;
    if (className !== undefined) c.className = className;
  }

  // Rows keyed by id, updated in place so a button is never swapped out under a click.
  function syncRows(tbody, items, update) {
    const rows = new Map([...tbody.rows].map((r) => [r.dataset.id, r]));
    items.forEach((item, i) => {
      let row = rows.get(item.id);
      if (!row) {
        row = tbody.insertRow();
        row.dataset.id = item.id;
      }
      rows.delete(item.id);
      if (tbody.rows[i] !== row) tbody.insertBefore(row, tbody.rows[i] || null);
      update(row, item);
    });
    rows.forEach((row) => row.remove());
  }

  function actionButton(row, index, label, danger, onClick) {
    const c = cell(row, index);
    let button = c.querySelector("button");
    if (!button) {
      button = document.createElement("button");
      button.type = "button";
      c.appendChild(button);
    }
    button.textContent = label;
    button.className = danger ? "danger" : "";
    button.onclick = onClick;
    return button;
  }

  // -- sections

  function renderRouter(router) {
    $("summary").textContent =
      `policy ${router.policy} · up ${duration(router.uptime_s)} · auth ${router.auth} · ` +
      `models ${router.models.join(", ") || "none"}`;
    $("requests-per-s").textContent = num(router.requests_per_s, 1);
    $("errors-per-s").textContent = num(router.errors_per_s, 1);
    $("requests-total").textContent = num(router.requests);
    $("queue").textContent =
      `${num(router.queue.in_flight)} · ${num(router.queue.waiting)} · ${num(router.queue.queued)}`;
    $("retries").textContent = `${num(router.retries)} · ${num(router.retry_budget, 1)}`;
    const pairs = (obj) => Object.entries(obj).sort().map(([id, count]) => ({ id, count }));
    for (const [table, data] of [["routing", router.routing], ["statuses", router.requests_by_status]]) {
      syncRows($(table).tBodies[0], pairs(data), (row, item) => {
        setText(row, 0, item.id);
        setText(row, 1, num(item.count));
      });
    }
  }

  function renderReplicas(replicas) {
    syncRows($("replicas").tBodies[0], replicas, (row, r) => {
      row.dataset.replicaId = r.id;
      row.dataset.state = r.state;
      setText(row, 0, r.id);
      setText(row, 1, r.model || "?");
      setText(row, 2, r.state, `state state-${r.state}`);
      setText(row, 3, num(r.in_flight));
      setText(row, 4, `${num(r.running)} · ${num(r.waiting)}`);
      setText(row, 5, pct(r.kv_usage));
      setText(row, 6, pct(r.prefix_hit_rate));
      setText(row, 7, num(r.requests));
      cell(row, 7).dataset.field = "requests";
      setText(row, 8, num(r.failures));
      setText(row, 9, num(r.tokens_per_s, 1));
      cell(row, 9).dataset.field = "tokens";
      setText(row, 10, num(r.restarts));
      const drained = r.admin_drained;
      actionButton(row, 11, drained ? "Undrain" : "Drain", !drained, () =>
        act(`/dashboard/replicas/${encodeURIComponent(r.id)}/${drained ? "undrain" : "drain"}`,
          drained ? `Let replica ${r.id} take new requests again?`
            : `Drain replica ${r.id}? It finishes what it has and gets no new requests.`));
    });
  }

  function renderKeys(keys) {
    const note = keys.error ? keys.error
      : keys.mode === "static" ? `${keys.static_keys} static key(s) from --api-key: no limits, nothing to show.`
      : keys.mode === "none" ? "No API keys: this router is open."
      : keys.data.length ? "" : "No API keys yet (fleet keys create).";
    $("keys-note").textContent = note;
    syncRows($("keys").tBodies[0], keys.data, (row, k) => {
      setText(row, 0, k.name);
      setText(row, 1, k.id);
      setText(row, 2, k.status, `state state-${k.status}`);
      setText(row, 3, k.models.join(", ") || "all");
      setText(row, 4, usage(k.rpm));
      setText(row, 5, usage(k.tpm));
      setText(row, 6, usage(k.concurrent));
      setText(row, 7, num(k.requests));
      setText(row, 8, num(k.tokens));
      if (k.status === "revoked") {
        cell(row, 9).replaceChildren();
      } else {
        actionButton(row, 9, "Revoke", true, () =>
          act(`/dashboard/keys/${encodeURIComponent(k.id)}/revoke`,
            `Revoke key '${k.name}' (${k.id})? Every request with it is refused from now on.`));
      }
    });
  }

  function renderEvents(events) {
    const items = events.map((e) => {
      const li = document.createElement("li");
      li.dataset.kind = e.kind;
      const time = document.createElement("time");
      time.textContent = clock(e.t);
      li.append(time, e.text);
      return li;
    });
    $("events").replaceChildren(...items);
  }

  // -- plots (uPlot)

  function plotOptions(target, series, yLabel) {
    const axis = { stroke: "#94a3b8", grid: { stroke: "#334155", width: 1 }, ticks: { stroke: "#334155" } };
    return {
      width: Math.max(target.clientWidth - 8, 300),
      height: 200,
      scales: { x: { time: true } },
      axes: [axis, { ...axis, label: yLabel }],
      series: [{}, ...series.map((label, i) => ({ label, stroke: COLORS[i % COLORS.length], width: 2 }))],
    };
  }

  function renderPlots(series) {
    if (typeof uPlot === "undefined") return;
    const ttftTarget = $("plot-ttft");
    const ttftData = [series.t, series.ttft_p50_ms, series.ttft_p99_ms];
    if (!plots.ttft) {
      plots.ttft = new uPlot(plotOptions(ttftTarget, ["p50", "p99"], "ms"), ttftData, ttftTarget);
    } else {
      plots.ttft.setData(ttftData);
    }
    const ids = Object.keys(series.tokens_per_s).sort();
    const tokensTarget = $("plot-tokens");
    const tokensData = [series.t, ...ids.map((id) => series.tokens_per_s[id])];
    if (!plots.tokens || plots.tokensIds !== ids.join("\n")) {
      if (plots.tokens) plots.tokens.destroy();
      plots.tokens = new uPlot(plotOptions(tokensTarget, ids, "tokens/s"), tokensData, tokensTarget);
      plots.tokensIds = ids.join("\n");
    } else {
      plots.tokens.setData(tokensData);
    }
  }

  window.addEventListener("resize", () => {
    for (const [plot, id] of [[plots.ttft, "plot-ttft"], [plots.tokens, "plot-tokens"]]) {
      if (plot) plot.setSize({ width: Math.max($(id).clientWidth - 8, 300), height: 200 });
    }
  });

  // -- talking to the router

  function render(state) {
    csrf = state.csrf;
    renderRouter(state.router);
    renderReplicas(state.replicas);
    renderKeys(state.keys);
    renderEvents(state.events);
    renderPlots(state.series);
    const updated = $("updated");
    updated.textContent = `updated ${clock(state.now)}`;
    updated.dataset.state = "ok";
  }

  async function refresh() {
    const response = await fetch("/dashboard/state", { credentials: "same-origin", cache: "no-store" });
    if (response.status === 401) {
      window.location.assign("/dashboard/login");
      return;
    }
    if (!response.ok) throw new Error(`state: HTTP ${response.status}`);
    render(await response.json());
  }

  async function poll() {
    try {
      await refresh();
    } catch (err) {
      const updated = $("updated");
      updated.textContent = `not updating: ${err.message}`;
      updated.dataset.state = "error";
    }
    window.setTimeout(poll, POLL_MS);
  }

  async function post(url) {
    return fetch(url, { method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrf || "" } });
  }

  async function act(url, question) {
    if (!window.confirm(question)) return;
    const response = await post(url);
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      window.alert((body.error && body.error.message) || `HTTP ${response.status}`);
    }
    await refresh().catch(() => {});
  }

  $("logout").addEventListener("click", async () => {
    await post("/dashboard/logout");
    window.location.assign("/dashboard/login");
  });

  poll();
})();
