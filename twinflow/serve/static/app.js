// The twin viewer: the plant tree, active alarms and one entity's twin, kept live by
// Server-Sent Events. Plain DOM code with no build step; every text from the API goes
// through textContent, never innerHTML.
"use strict";

(() => {
  const API = "/api/v1";
  const TOKEN_COOKIE = "twinflow_token";
  // Least to most severe, as the server ranks them when it rolls a subtree up.
  const SEVERITY = ["OK", "UNKNOWN", "STALE", "WARN", "ALARM"];
  const RANGES = [
    { id: "1h", label: "1 h", ms: 3_600_000 },
    { id: "3h", label: "3 h", ms: 3 * 3_600_000 },
    { id: "24h", label: "24 h", ms: 24 * 3_600_000 },
  ];
  const VERDICTS = [
    { path: "ack", label: "Ack" },
    { path: "confirm", label: "Confirm" },
    { path: "reject", label: "Reject" },
  ];
  const PLANT_GAP_MS = 1000;
  const ENTITY_GAP_MS = 1000;
  // History reaches QuestDB a little after the state that announced it; re-read it often.
  const CHARTS_EVERY_MS = 15_000;
  const RECONNECT_MS = 3000;
  const HEALTH_EVERY_MS = 5000;
  const CHART_HEIGHT = 200;

  const state = {
    tree: null,
    nodes: new Map(), // tree node id -> {node, li, ...the parts repainted in place}
    own: new Map(), // entity id -> its own status (the tree's status is the subtree's worst)
    ownSeq: new Map(), // entity id -> number of the state event that set `own` last
    eventSeq: 0,
    alarms: [],
    route: { view: "alarms" },
    range: "3h",
    entity: null, // the entity page's parts while it is shown
    events: null,
    reconnect: null,
    stream: { kind: "connecting", text: "connecting…" },
    health: null, // the server's last /health answer
  };

  // -- small helpers ----------------------------------------------------------------

  const $ = (selector, root = document) => root.querySelector(selector);

  function el(tag, attrs = {}, children = []) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    setChildren(node, children);
    return node;
  }

  // replaceChildren for what the views build: nested lists flattened, blanks dropped.
  function setChildren(node, ...children) {
    const kept = children
      .flat(Infinity)
      .filter((c) => c !== null && c !== undefined && c !== false && c !== "");
    node.replaceChildren(
      ...kept.map((c) => (c instanceof Node ? c : document.createTextNode(String(c)))),
    );
  }


  function fmt(value) {
    if (value === null || value === undefined || Number.isNaN(value)) return "—";
    if (typeof value === "boolean") return value ? "true" : "false";
    const size = Math.abs(value);
    if (size >= 1000) return value.toFixed(0);
    if (size >= 100) return value.toFixed(1);
    if (size >= 1 || size === 0) return value.toFixed(2);
    return value.toPrecision(3);
  }

  const fmtHealth = (value) =>
    value === null ? "—" : Number.isInteger(value) ? String(value) : value.toFixed(1);

  const withUnit = (value, unit) =>
    unit && value !== null && value !== undefined ? `${fmt(value)} ${unit}` : fmt(value);

  function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    if (seconds < 90) return `${Math.round(seconds)} s`;
    if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
    if (seconds < 172_800) return `${(seconds / 3600).toFixed(1)} h`;
    return `${(seconds / 86_400).toFixed(1)} d`;
  }

  function fmtTime(ms) {
    if (ms === null || ms === undefined) return "—";
    const moment = new Date(ms);
    const today = moment.toDateString() === new Date().toDateString();
    const time = moment.toLocaleTimeString(undefined, { hour12: false });
    return today ? time : `${moment.toLocaleDateString()} ${time}`;
  }

  const ago = (ms) => `${fmtDuration(Math.max(0, (Date.now() - ms) / 1000))} ago`;

  function timeEl(ms) {
    return el("time", { datetime: new Date(ms).toISOString(), title: ago(ms) }, fmtTime(ms));
  }

  function statusBadge(status) {
    return el("span", { class: "badge", "data-status": status }, status);
  }

  function entityLink(id) {
    return el("a", { href: `#/entity/${encodeURIComponent(id)}` }, id);
  }

  // Runs `task` at most once per `gapMs`; calls in between fold into one later run.
  function throttled(task, gapMs) {
    let last = 0;
    let timer = null;
    return () => {
      if (timer !== null) return;
      const wait = Math.max(0, last + gapMs - Date.now());
      timer = setTimeout(() => {
        timer = null;
        last = Date.now();
        task();
      }, wait);
    };
  }

  // -- the API ----------------------------------------------------------------------

  // An API refusal: its detail, and the field to blame when there is one.
  class ApiError extends Error {
    constructor(detail, field) {
      super(detail);
      this.field = field;
    }
  }

  async function api(path, { method = "GET", body } = {}) {
    const init = { method, headers: { Accept: "application/json" }, credentials: "same-origin" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(API + path, init);
    } catch (error) {
      throw new ApiError(`the server did not answer (${error.message})`, null);
    }
    const answer = await response.json().catch(() => null);
    if (!response.ok) {
      const detail = (answer && answer.detail) || `HTTP ${response.status}`;
      if (response.status === 401) askForToken(detail);
      throw new ApiError(detail, (answer && answer.field) || null);
    }
    return answer;
  }

  // -- signing in -------------------------------------------------------------------

  function askForToken(detail) {
    const form = $("#auth");
    const wasHidden = form.hidden;
    $("#auth-reason").textContent = `The server refused the request: ${detail}. Enter your token.`;
    form.hidden = false;
    if (wasHidden) $("#auth-token").focus();
  }

  function signIn(event) {
    event.preventDefault();
    const token = $("#auth-token").value.trim();
    // A cookie value cannot hold these; the server compares the token byte for byte.
    if (!token || /[\s;,"\\]/.test(token)) {
      $("#auth-error").textContent =
        "A token has no spaces, quotes, commas, semicolons or backslashes.";
      return;
    }
    const secure = location.protocol === "https:" ? "; Secure" : "";
    document.cookie = `${TOKEN_COOKIE}=${token}; path=/; SameSite=Strict${secure}`;
    $("#auth-token").value = "";
    $("#auth-error").textContent = "";
    $("#auth").hidden = true;
    connectEvents();
  }

  // -- live events ------------------------------------------------------------------

  function setConnection(kind, text) {
    state.stream = { kind, text };
    paintConnection();
  }

  function paintConnection() {
    const { kind, text } = state.stream;
    const health = state.health;
    const notes = [];
    if (kind === "live" && health) {
      if (!health.caught_up) notes.push("catching up on the topics");
      if (!health.kafka_ok) notes.push("Kafka unreachable");
      if (!health.questdb_ok) notes.push("history unavailable (QuestDB)");
    }
    const status = $("#connection");
    status.dataset.state = notes.length ? "degraded" : kind;
    status.textContent = [text, ...notes].join(" · ");
  }

  // /health needs no token; it tells what the stream cannot (a source is down).
  async function checkHealth() {
    try {
      state.health = await api("/health");
    } catch {
      state.health = null;
    }
    paintConnection();
  }

  function connectEvents() {
    clearTimeout(state.reconnect);
    if (state.events) state.events.close();
    setConnection("connecting", "connecting…");
    const events = new EventSource(`${API}/events`);
    state.events = events;
    events.addEventListener("ready", (event) => {
      state.health = {
        ...(state.health || { kafka_ok: true, questdb_ok: true }),
        ...JSON.parse(event.data),
      };
      setConnection("live", "live");
      // Changes made while no stream was open were never sent: read everything again.
      loadPlant();
      loadAlarms();
      refreshEntity();
      refreshCharts();
    });
    events.addEventListener("state", (event) => onState(JSON.parse(event.data)));
    events.addEventListener("alarm", (event) => onAlarm(JSON.parse(event.data)));
    events.addEventListener("error", () => {
      if (events.readyState === EventSource.CLOSED) {
        // Closed for good (an HTTP error such as 401): a plain request learns why (and
        // asks for a token if that is it), then the stream is tried again.
        setConnection("down", "disconnected; retrying");
        loadAlarms();
        state.reconnect = setTimeout(connectEvents, RECONNECT_MS);
      } else {
        setConnection("connecting", "reconnecting…");
      }
    });
  }

  function onState(change) {
    state.eventSeq += 1;
    state.own.set(change.entity_id, change.status);
    state.ownSeq.set(change.entity_id, state.eventSeq);
    paintEntity(change.entity_id);
    schedulePlant();
    const shown = state.entity;
    if (shown && shown.id === change.entity_id) {
      setChildren(shown.parts.status, statusBadge(change.status));
      scheduleEntity();
    }
  }

  function onAlarm(alarm) {
    scheduleAlarms();
    const shown = state.entity;
    if (shown && shown.id === alarm.entity_id) scheduleEntity();
  }

  // -- the plant tree ---------------------------------------------------------------

  const schedulePlant = throttled(() => loadPlant(), PLANT_GAP_MS);

  async function loadPlant() {
    const seqAtRequest = state.eventSeq;
    let tree;
    try {
      tree = await api("/plant");
    } catch (error) {
      $("#plant-summary").textContent = `The plant is unavailable: ${error.message}`;
      return;
    }
    if (!sameShape(state.tree, tree)) buildTree(tree);
    state.tree = tree;
    walk(tree, (node) => {
      state.nodes.get(node.id).node = node;
      // A state event newer than this read wins over the tree's own status.
      if (node.kind === "entity" && (state.ownSeq.get(node.id) || 0) <= seqAtRequest) {
        state.own.set(node.id, node.own_status);
      }
    });
    walk(tree, (node) => paintNode(node.id));
    paintSummary(tree);
  }

  function walk(node, visit) {
    visit(node);
    for (const child of node.children) walk(child, visit);
  }

  function sameShape(a, b) {
    if (!a || a.id !== b.id || a.children.length !== b.children.length) return false;
    return a.children.every((child, i) => sameShape(child, b.children[i]));
  }

  function buildTree(tree) {
    state.nodes.clear();
    state.nodes.set(tree.id, { node: tree });
    const list = el("ul", { class: "tree" }, tree.children.map(groupItem));
    setChildren($("#tree"), list);
    markCurrent();
  }

  function groupItem(node) {
    const parts = {
      node,
      dot: el("span", { class: "dot", "aria-hidden": "true" }),
      label: el("span", { class: "sr-only" }),
      meta: el("span", { class: "meta" }),
    };
    const items = node.children.map((child) =>
      child.kind === "entity" ? entityItem(child) : groupItem(child),
    );
    parts.li = el("li", { class: `group ${node.kind}`, "data-node": node.id }, [
      el("details", { open: true }, [
        el("summary", {}, [
          parts.dot,
          el("span", { class: "name" }, node.name),
          parts.label,
          parts.meta,
        ]),
        el("ul", {}, items),
      ]),
    ]);
    state.nodes.set(node.id, parts);
    return parts.li;
  }

  function entityItem(node) {
    const parts = {
      node,
      dot: el("span", { class: "dot", "aria-hidden": "true" }),
      label: el("span", { class: "sr-only" }),
      health: el("span", { class: "health" }),
      alarms: el("span", { class: "alarm-count" }),
    };
    parts.link = el("a", { href: `#/entity/${encodeURIComponent(node.id)}` }, [
      parts.dot,
      el("span", { class: "name" }, node.name),
      parts.label,
      el("span", { class: "type" }, node.entity_type || ""),
      parts.health,
      parts.alarms,
    ]);
    const nested = node.children.length ? el("ul", {}, node.children.map(entityItem)) : null;
    parts.li = el("li", { class: "entity", "data-entity": node.id }, [parts.link, nested]);
    state.nodes.set(node.id, parts);
    return parts.li;
  }

  function paintNode(id) {
    const parts = state.nodes.get(id);
    if (!parts || !parts.li) return;
    if (parts.node.kind === "entity") {
      paintEntity(id);
      return;
    }
    const node = parts.node;
    parts.li.dataset.status = node.status;
    parts.label.textContent = `, ${node.status}`;
    const bits = [`${node.entities} entities`];
    if (node.health_min !== null) bits.push(`health ≥ ${fmtHealth(node.health_min)}`);
    if (node.active_alarms)
      bits.push(`${node.active_alarms} active alarm${node.active_alarms > 1 ? "s" : ""}`);
    parts.meta.textContent = bits.join(" · ");
  }

  function paintEntity(id) {
    const parts = state.nodes.get(id);
    if (!parts || !parts.li) return;
    const node = parts.node;
    const own = state.own.get(id) || node.status;
    parts.li.dataset.status = own;
    if (node.status !== own) parts.li.dataset.rollup = node.status;
    else delete parts.li.dataset.rollup;
    parts.label.textContent =
      node.children.length && node.status !== own ? `, ${own}, below: ${node.status}` : `, ${own}`;
    parts.health.textContent = node.health_min === null ? "" : fmtHealth(node.health_min);
    parts.health.title = node.children.length ? "lowest health here and below" : "health";
    parts.alarms.textContent = node.active_alarms ? String(node.active_alarms) : "";
    parts.alarms.title = node.active_alarms ? `${node.active_alarms} active alarm(s)` : "";
  }

  function paintSummary(tree) {
    const counts = new Map();
    walk(tree, (node) => {
      if (node.kind !== "entity") return;
      const own = state.own.get(node.id) || node.status;
      counts.set(own, (counts.get(own) || 0) + 1);
    });
    const bits = SEVERITY.slice()
      .reverse()
      .filter((s) => counts.has(s))
      .map((s) => `${counts.get(s)} ${s}`);
    $("#plant-summary").textContent = `${tree.entities} entities: ${bits.join(", ")}`;
  }

  function markCurrent() {
    const current = state.route.view === "entity" ? state.route.id : null;
    const nav = $("#nav-alarms");
    if (state.route.view === "alarms") nav.setAttribute("aria-current", "page");
    else nav.removeAttribute("aria-current");
    for (const [id, parts] of state.nodes) {
      if (!parts.link) continue;
      if (id === current) parts.link.setAttribute("aria-current", "page");
      else parts.link.removeAttribute("aria-current");
    }
  }

  // -- alarms -----------------------------------------------------------------------

  const scheduleAlarms = throttled(loadAlarms, PLANT_GAP_MS);

  async function loadAlarms() {
    try {
      state.alarms = await api("/alarms?state=active");
    } catch (error) {
      if (state.route.view === "alarms")
        $("#alarms-error").textContent = `Alarms are unavailable: ${error.message}`;
      return;
    }
    const total = $("#alarm-total");
    total.textContent = state.alarms.length ? String(state.alarms.length) : "";
    if (state.route.view === "alarms") {
      $("#alarms-error").textContent = "";
      syncAlarmList($("#alarm-list"), state.alarms, true);
    }
  }

  // Updates rows in place, so a focused button and a verdict's message survive a refresh.
  function syncAlarmList(list, alarms, showEntity) {
    const rows = new Map(
      [...list.children].filter((row) => row.dataset.alarm).map((row) => [row.dataset.alarm, row]),
    );
    const focusedGone = [...rows.keys()].some(
      (id) =>
        !alarms.some((a) => a.alarm_id === id) && rows.get(id).contains(document.activeElement),
    );
    for (const [id, row] of rows) if (!alarms.some((a) => a.alarm_id === id)) row.remove();
    let previous = null;
    for (const alarm of alarms) {
      let row = rows.get(alarm.alarm_id);
      if (!row) row = alarmRow(alarm, showEntity);
      fillAlarmRow(row, alarm);
      if (previous ? previous.nextSibling !== row : list.firstChild !== row) {
        if (previous) previous.after(row);
        else list.prepend(row);
      }
      previous = row;
    }
    const empty = list.parentElement.querySelector(".empty");
    if (empty) empty.hidden = alarms.length > 0;
    // Keyboard users keep their place when the row they were on ends.
    if (focusedGone) list.parentElement.querySelector("h2, h3").focus();
  }

  function alarmRow(alarm, showEntity) {
    const result = el("p", { class: "result", role: "status" });
    const buttons = VERDICTS.map((verdict) =>
      el("button", { type: "button", class: `verdict ${verdict.path}` }, verdict.label),
    );
    const row = el("li", { class: "alarm", "data-alarm": alarm.alarm_id }, [
      el("div", { class: "alarm-head" }),
      el("div", { class: "alarm-body" }),
      el("div", { class: "actions", role: "group", "aria-label": `Verdict on ${alarm.alarm_id}` }, [
        ...buttons,
        result,
      ]),
    ]);
    row.dataset.showEntity = showEntity ? "yes" : "no";
    buttons.forEach((button, i) =>
      button.addEventListener("click", () => judge(row, VERDICTS[i], buttons, result)),
    );
    return row;
  }

  function fillAlarmRow(row, alarm) {
    const head = $(".alarm-head", row);
    const who = alarm.operator ? ` by ${alarm.operator}` : "";
    const judged = alarm.verdict
      ? `${alarm.verdict}${who}`
      : alarm.acknowledged
        ? `acknowledged${who}`
        : null;
    setChildren(
      head,
      row.dataset.showEntity === "yes" ? el("strong", {}, entityLink(alarm.entity_id)) : null,
      el("span", { class: "kind" }, alarm.kind.replace("_", " ")),
      el("span", {}, ["since ", timeEl(alarm.start_ms), ` (${ago(alarm.start_ms)})`]),
      el("span", {}, `peak score ${fmt(alarm.peak_score)} (threshold ${fmt(alarm.threshold)})`),
      el(
        "span",
        {},
        `${alarm.anomalous_windows} anomalous window${alarm.anomalous_windows === 1 ? "" : "s"}`,
      ),
      judged ? el("span", { class: "judged" }, judged) : null,
    );
    const body = $(".alarm-body", row);
    setChildren(
      body,
      alarm.contributions.length ? contributionsTable(alarm.contributions) : null,
      alarm.forecast ? forecastLine(alarm.forecast) : null,
      alarm.note ? el("p", { class: "note" }, `Note: ${alarm.note}`) : null,
    );
  }

  function tableHead(headers) {
    return el("thead", {}, el("tr", {}, headers.map((h) => el("th", { scope: "col" }, h))));
  }

  function contributionsTable(contributions) {
    return el("table", { class: "contributions" }, [
      el("caption", { class: "sr-only" }, "What explains the alarm"),
      tableHead(["sensor", "feature", "value", "expected", "share"]),
      el(
        "tbody",
        {},
        contributions.map((c) => {
          const outside = c.value < c.expected_low || c.value > c.expected_high;
          return el("tr", {}, [
            el("td", {}, c.sensor),
            el("td", {}, c.feature),
            el("td", { class: outside ? "outside num" : "num" }, fmt(c.value)),
            el("td", { class: "num" }, `${fmt(c.expected_low)} – ${fmt(c.expected_high)}`),
            el("td", { class: "num" }, `${(100 * c.weight).toFixed(1)} %`),
          ]);
        }),
      ),
    ]);
  }

  function forecastLine(f) {
    const limit = `${f.limit.replace("_", " ")} (${fmt(f.limit_value)})`;
    return el("p", { class: "forecast" }, [
      `${f.sensor} reaches its ${limit} in ${fmtDuration(f.time_to_limit_s)}, around `,
      timeEl(f.ts_ms + 1000 * f.time_to_limit_s),
    ]);
  }

  async function judge(row, verdict, buttons, result) {
    buttons.forEach((button) => (button.disabled = true));
    result.className = "result";
    result.textContent = `sending ${verdict.path}…`;
    try {
      await api(`/alarms/${encodeURIComponent(row.dataset.alarm)}/${verdict.path}`, {
        method: "POST",
        body: { note: "" },
      });
      result.textContent = `${verdict.label} sent; the twin applies it with its next window.`;
    } catch (error) {
      result.className = "result error";
      result.textContent = `${verdict.label} refused: ${error.message}`;
    } finally {
      buttons.forEach((button) => (button.disabled = false));
    }
  }

  // -- routes -----------------------------------------------------------------------

  function parseRoute() {
    const match = /^#\/entity\/([^/?]+)/.exec(location.hash);
    if (match) return { view: "entity", id: decodeURIComponent(match[1]) };
    return { view: "alarms" };
  }

  function render() {
    state.route = parseRoute();
    closeEntity();
    markCurrent();
    const main = $("#main");
    if (state.route.view === "entity") {
      openEntity(main, state.route.id);
    } else {
      document.title = "twinflow · active alarms";
      setChildren(
        main,
        el("section", { class: "alarms", "aria-labelledby": "alarms-title" }, [
          el("h2", { id: "alarms-title", tabindex: "-1" }, "Active alarms"),
          el("p", { class: "error", id: "alarms-error", role: "alert" }),
          el("p", { class: "empty muted", hidden: true }, "No active alarms."),
          el("ol", { class: "alarm-list", id: "alarm-list" }),
        ]),
      );
      syncAlarmList($("#alarm-list"), state.alarms, true);
      loadAlarms();
    }
  }

  // -- the entity page --------------------------------------------------------------

  const scheduleEntity = throttled(refreshEntity, ENTITY_GAP_MS);

  function openEntity(main, id) {
    document.title = `twinflow · ${id}`;
    const parts = {
      status: el("span", { class: "status" }),
      facts: el("dl", { class: "facts" }),
      score: el("div", { class: "score" }),
      error: el("p", { class: "error", role: "alert" }),
      alarms: el("ol", { class: "alarm-list" }),
      sensors: el("tbody", {}),
      derived: el("tbody", {}),
      forecasts: el("div", {}),
      setpoints: el("div", { class: "setpoints" }),
      spans: el("div", { class: "spans" }),
      charts: el("div", { class: "charts" }),
      relatives: el("p", { class: "relatives" }),
    };
    const rangePicker = el("fieldset", { class: "range" }, [
      el("legend", {}, "Show the last"),
      ...RANGES.map((range) =>
        el("label", {}, [
          el("input", {
            type: "radio",
            name: "range",
            value: range.id,
            checked: range.id === state.range,
            onchange: () => {
              state.range = range.id;
              refreshCharts();
            },
          }),
          ` ${range.label}`,
        ]),
      ),
    ]);
    setChildren(
      main,
      el("article", { class: "entity-page", "data-entity-page": id }, [
        el("header", { class: "entity-head" }, [
          el("h2", { tabindex: "-1" }, [id, " ", parts.status]),
          parts.relatives,
        ]),
        parts.error,
        el("div", { class: "overview" }, [parts.facts, parts.score]),
        el("section", { "aria-labelledby": "ea-title" }, [
          el("h3", { id: "ea-title", tabindex: "-1" }, "Active alarms"),
          el("p", { class: "empty muted", hidden: true }, "None."),
          parts.alarms,
        ]),
        el("section", { class: "history", "aria-labelledby": "eh-title" }, [
          el("h3", { id: "eh-title" }, "History"),
          rangePicker,
          el("p", { class: "legend muted" }, [
            el("span", { class: "key key-mean" }),
            " mean ",
            el("span", { class: "key key-band" }),
            " min – max ",
            el("span", { class: "key key-window" }),
            " window mean ± std ",
            el("span", { class: "key key-alarm" }),
            " alarm ",
            el("span", { class: "key key-rejected" }),
            " rejected alarm",
          ]),
          parts.spans,
          parts.charts,
        ]),
        el("section", { "aria-labelledby": "es-title" }, [
          el("h3", { id: "es-title" }, "Sensors"),
          el("table", { class: "sensors" }, [
            tableHead([
              "sensor", "value", "at", "quality", "window", "mean", "min", "max", "std",
              "slope/s", "flagged",
            ]),
            parts.sensors,
          ]),
        ]),
        el("div", { class: "columns" }, [
          el("section", { "aria-labelledby": "ed-title" }, [
            el("h3", { id: "ed-title" }, "Derived metrics"),
            el("table", { class: "derived" }, parts.derived),
          ]),
          el("section", { "aria-labelledby": "ef-title" }, [
            el("h3", { id: "ef-title" }, "Forecasts"),
            parts.forecasts,
          ]),
        ]),
        el("section", { "aria-labelledby": "esp-title" }, [
          el("h3", { id: "esp-title" }, "Setpoints"),
          parts.setpoints,
        ]),
      ]),
    );
    state.entity = {
      id,
      parts,
      charts: new Map(),
      chartsAsked: 0,
      setpointForms: new Map(),
      view: null,
      timer: setInterval(refreshCharts, CHARTS_EVERY_MS),
    };
    $("h2", main).focus();
    refreshEntity();
  }

  function closeEntity() {
    if (!state.entity) return;
    for (const chart of state.entity.charts.values()) chart.plot.destroy();
    clearInterval(state.entity.timer);
    state.entity.resize?.disconnect();
    state.entity = null;
  }

  async function refreshEntity() {
    const shown = state.entity;
    if (!shown) return;
    let view;
    try {
      view = await api(`/entities/${encodeURIComponent(shown.id)}`);
    } catch (error) {
      if (state.entity === shown)
        shown.parts.error.textContent = `This entity is unavailable: ${error.message}`;
      return;
    }
    if (state.entity !== shown) return;
    shown.parts.error.textContent = "";
    const first = shown.view === null;
    shown.view = view;
    fillEntity(shown, view);
    if (first) refreshCharts();
  }

  function fillEntity(shown, view) {
    const { parts } = shown;
    setChildren(parts.status, statusBadge(view.status));
    setChildren(
      parts.relatives,
      `${view.entity_type} at ${view.site} / ${view.line}`,
      view.parent ? [" · part of ", entityLink(view.parent)] : [],
      view.children.length
        ? [
            " · parts: ",
            ...view.children.flatMap((c, i) => (i ? [", ", entityLink(c)] : [entityLink(c)])),
          ]
        : [],
    );
    const counts = view.counts || {};
    setChildren(
      parts.facts,
      ...fact("health", view.health === null ? "—" : `${fmtHealth(view.health)} / 100`),
      ...fact("state at", view.ts_ms ? timeEl(view.ts_ms) : "no state yet"),
      ...fact("readings", counts.readings ?? "—"),
      ...fact("flagged", counts.flagged ?? "—"),
      ...fact("windows", counts.windows ?? "—"),
      ...fact("anomalies", counts.anomalies ?? "—"),
      ...fact("alarms raised", counts.alarms ?? "—"),
      ...fact(
        "late · duplicates · dead letters",
        counts.readings === undefined
          ? "—"
          : `${counts.late} · ${counts.duplicates} · ${counts.dead_letters}`,
      ),
    );
    setChildren(parts.score, scoreMeter(view));
    syncAlarmList(parts.alarms, view.active_alarms, false);
    setChildren(parts.sensors, ...Object.values(view.sensors).map(sensorRow));
    if (!view.windows_available) {
      parts.sensors.append(
        el(
          "tr",
          {},
          el(
            "td",
            { colspan: 11, class: "muted" },
            "Latest windows are unavailable (QuestDB does not answer).",
          ),
        ),
      );
    }
    const derived = Object.entries(view.derived);
    setChildren(
      parts.derived,
      ...(derived.length
        ? derived.map(([name, value]) =>
            el("tr", {}, [
              el("th", { scope: "row" }, name),
              el("td", { class: "num" }, fmt(value)),
            ]),
          )
        : [el("tr", {}, el("td", { class: "muted" }, "none yet"))]),
    );
    setChildren(parts.forecasts, forecastsTable(view));
    fillSetpoints(shown, view);
  }

  function fact(name, value) {
    return [el("div", {}, [el("dt", {}, name), el("dd", {}, value)])];
  }

  function scoreMeter(view) {
    if (view.anomaly_score === null || view.threshold === null) {
      return el(
        "p",
        { class: "muted" },
        "No anomaly score yet (the model is still learning this entity).",
      );
    }
    const ratio = view.anomaly_score / view.threshold;
    return el("div", {}, [
      el(
        "label",
        { for: "score-meter" },
        `anomaly score ${fmt(view.anomaly_score)} vs threshold ${fmt(view.threshold)} (${fmt(ratio)}×)`,
      ),
      el("meter", {
        id: "score-meter",
        min: 0,
        max: 2 * view.threshold,
        low: 0.8 * view.threshold,
        high: view.threshold,
        optimum: 0,
        value: Math.min(view.anomaly_score, 2 * view.threshold),
      }),
    ]);
  }

  function sensorRow(sensor) {
    const w = sensor.window;
    const flags = sensor.quality.length ? sensor.quality.join(", ") : "ok";
    const cells = w
      ? [
          el("td", {}, [timeEl(w.window_start_ms), ` (${w.count})`]),
          ...[w.mean, w.min, w.max, w.std, w.slope].map((v) => el("td", { class: "num" }, fmt(v))),
          el("td", { class: "num" }, String(w.flagged)),
        ]
      : [el("td", { colspan: 7, class: "muted" }, "no closed window")];
    return el("tr", { "data-sensor": sensor.name }, [
      el("th", { scope: "row" }, sensor.name),
      el("td", { class: "num" }, withUnit(sensor.value, sensor.unit)),
      el("td", {}, sensor.ts_ms ? timeEl(sensor.ts_ms) : "—"),
      el("td", { class: sensor.quality.length ? "flags" : "" }, flags),
      ...cells,
    ]);
  }

  function forecastsTable(view) {
    const forecasts = Object.values(view.forecasts);
    if (!forecasts.length)
      return el("p", { class: "muted" }, "No sensor is trending towards a limit.");
    return el("table", {}, [
      tableHead(["sensor", "limit", "level", "trend", "time to limit"]),
      el(
        "tbody",
        {},
        forecasts.map((f) => {
          const unit = view.sensors[f.sensor] ? view.sensors[f.sensor].unit : "";
          const high = f.time_to_limit_high_s === null ? "∞" : fmtDuration(f.time_to_limit_high_s);
          return el("tr", {}, [
            el("th", { scope: "row" }, f.sensor),
            el("td", {}, `${f.limit.replace("_", " ")} ${withUnit(f.limit_value, unit)}`),
            el("td", { class: "num" }, withUnit(f.level, unit)),
            el("td", { class: "num" }, `${fmt(f.slope_per_h)} ${unit}/h`),
            el("td", {}, [
              fmtDuration(f.time_to_limit_s),
              ` (${fmtDuration(f.time_to_limit_low_s)} – ${high}), from `,
              timeEl(f.ts_ms),
            ]),
          ]);
        }),
      ),
    ]);
  }

  function fillSetpoints(shown, view) {
    const setpoints = Object.values(view.setpoints);
    if (!setpoints.length) {
      setChildren(
        shown.parts.setpoints,
        el("p", { class: "muted" }, "This entity has no writable setpoints."),
      );
      return;
    }
    for (const setpoint of setpoints) {
      let form = shown.setpointForms.get(setpoint.name);
      if (!form) {
        form = setpointForm(shown.id, setpoint);
        shown.setpointForms.set(setpoint.name, form);
        shown.parts.setpoints.append(form.root);
      }
      const s = setpoint.state;
      setChildren(
        form.current,
        ...fact(
          "desired",
          s && s.desired !== null ? withUnit(s.desired, setpoint.unit) : "never commanded",
        ),
        ...fact(
          "reported",
          s && s.reported !== null ? withUnit(s.reported, setpoint.unit) : "not reported",
        ),
        ...fact("status", s && s.status ? s.status.replace("_", " ") : "—"),
        ...(s && s.expires_ms ? fact("expires", timeEl(s.expires_ms)) : []),
        ...(s && s.detail ? fact("detail", s.detail) : []),
      );
    }
  }

  function setpointForm(entityId, setpoint) {
    const inputId = `setpoint-${setpoint.name}`;
    const hintId = `${inputId}-hint`;
    const input =
      setpoint.type === "bool"
        ? el("select", { id: inputId, name: "value", "aria-describedby": hintId }, [
            el("option", { value: "true" }, "true"),
            el("option", { value: "false" }, "false"),
          ])
        : el("input", {
            id: inputId,
            name: "value",
            type: "number",
            step: setpoint.type === "int" ? "1" : "any",
            required: true,
            "aria-describedby": hintId,
          });
    const result = el("output", { class: "result", for: inputId, role: "status" });
    const current = el("dl", { class: "facts" });
    const button = el("button", { type: "submit" }, "Send");
    const root = el("form", { class: "setpoint", "data-setpoint": setpoint.name }, [
      el("h4", {}, `${setpoint.name}${setpoint.unit ? ` (${setpoint.unit})` : ""}`),
      current,
      el("label", { for: inputId }, `New ${setpoint.name}`),
      input,
      button,
      el("p", { class: "hint muted", id: hintId }, setpoint.allowed),
      result,
    ]);
    root.addEventListener("submit", async (event) => {
      event.preventDefault();
      const raw = input.value;
      const value = setpoint.type === "bool" ? raw === "true" : Number(raw);
      button.disabled = true;
      input.removeAttribute("aria-invalid");
      result.className = "result";
      result.textContent = "sending…";
      try {
        const command = await api(
          `/entities/${encodeURIComponent(entityId)}/setpoints/${encodeURIComponent(setpoint.name)}`,
          {
            method: "PUT",
            body: { value, expires_s: 60 },
          },
        );
        result.textContent = `Sent (command ${command.command_id}); waiting for the machine to report it.`;
        scheduleEntity();
      } catch (error) {
        result.className = "result error";
        result.textContent = `Refused: ${error.message}`;
        if (error.field === "value") input.setAttribute("aria-invalid", "true");
      } finally {
        button.disabled = false;
      }
    });
    return { root, current };
  }

  // -- charts -----------------------------------------------------------------------

  const COLORS = {
    mean: "#1d5fbf",
    band: "rgba(29, 95, 191, 0.14)",
    edge: "rgba(29, 95, 191, 0.35)",
    window: "rgba(224, 140, 0, 0.22)",
    flagged: "#b35c00",
    alarm: "rgba(209, 36, 47, 0.13)",
    rejected: "rgba(120, 120, 120, 0.16)",
  };

  async function refreshCharts() {
    const shown = state.entity;
    if (!shown || !shown.view) return;
    // The server mounts /vendor only where `twinflow setup` installed the chart library.
    if (typeof uPlot === "undefined") {
      setChildren(
        shown.parts.charts,
        el(
          "p",
          { class: "error" },
          "Charts need their library: run `twinflow setup`, then reload.",
        ),
      );
      return;
    }
    // A slow answer for an older range must not overwrite a newer one.
    const asked = ++shown.chartsAsked;
    const range = RANGES.find((r) => r.id === state.range);
    const to = Date.now();
    const from = to - range.ms;
    const sensors = Object.values(shown.view.sensors);
    const width = chartWidth(shown);
    const points = Math.max(50, Math.min(1000, Math.round(width)));
    const answers = await Promise.all(
      sensors.map((sensor) =>
        api(
          `/entities/${encodeURIComponent(shown.id)}/series?` +
            new URLSearchParams({ sensor: sensor.name, from, to, points }),
        ).then(
          (series) => ({ sensor, series }),
          (error) => ({ sensor, error }),
        ),
      ),
    );
    if (state.entity !== shown || asked !== shown.chartsAsked) return;
    const spans = answers.find((a) => a.series);
    setChildren(shown.parts.spans, spans ? spansList(spans.series.alarms) : "");
    for (const answer of answers) drawChart(shown, answer, { from, to, width });
    watchWidth(shown);
  }

  function chartWidth(shown) {
    const box = shown.parts.charts.getBoundingClientRect().width || 900;
    // Two charts a row when there is room for both.
    return box >= 816 ? Math.floor((box - 16) / 2) : Math.floor(box);
  }

  function watchWidth(shown) {
    if (shown.resize) return;
    let last = chartWidth(shown);
    shown.resize = new ResizeObserver(() => {
      const width = chartWidth(shown);
      if (width === last) return;
      last = width;
      for (const chart of shown.charts.values())
        chart.plot.setSize({ width, height: CHART_HEIGHT });
    });
    shown.resize.observe(shown.parts.charts);
  }

  function spansList(spans) {
    if (!spans.length) return el("p", { class: "muted" }, "No alarm in this range.");
    return el(
      "ul",
      { class: "span-list" },
      spans.map((span) => {
        const contributions = parseExplanation(span.explanation);
        return el("li", {}, [
          el("span", {
            class: `key ${span.verdict === "rejected" ? "key-rejected" : "key-alarm"}`,
          }),
          ` ${span.kind.replace("_", " ")} from `,
          timeEl(span.start_ms),
          span.end_ms === null ? " (active)" : [" to ", timeEl(span.end_ms)],
          span.peak_score === null ? "" : ` · peak ${fmt(span.peak_score)}`,
          span.verdict ? ` · ${span.verdict}` : "",
          span.top_sensors ? ` · top sensors: ${span.top_sensors.split(",").join(", ")}` : "",
          el("br"),
          el(
            "span",
            { class: "muted" },
            contributions ? explainBriefly(contributions) : span.explanation,
          ),
        ]);
      }),
    );
  }

  const expected = (c) => `expected ${fmt(c.expected_low)} – ${fmt(c.expected_high)}`;
  const share = (c) => `${(100 * c.weight).toFixed(0)} %`;

  function explainBriefly(contributions) {
    return contributions
      .slice(0, 3)
      .map((c) => `${c.sensor} ${c.feature} ${fmt(c.value)} (${expected(c)}, ${share(c)})`)
      .join("; ");
  }

  // QuestDB keeps an alarm's contributions as JSON text; anything else is shown as it is.
  function parseExplanation(text) {
    try {
      const parsed = JSON.parse(text);
      return Array.isArray(parsed) && parsed.length && "sensor" in parsed[0] ? parsed : null;
    } catch {
      return null;
    }
  }

  function drawChart(shown, answer, { from, to, width }) {
    const { sensor } = answer;
    const range = { from: from / 1000, to: to / 1000 };
    let chart = shown.charts.get(sensor.name);
    if (!chart) {
      chart = newChart(shown, sensor, width, range);
      shown.charts.set(sensor.name, chart);
    }
    chart.range = range;
    if (answer.error) {
      chart.note.textContent = `History unavailable: ${answer.error.message}`;
      chart.figure.dataset.points = "0";
      chart.extras = { windows: [], alarms: [] };
      chart.plot.setData([[], [], [], []]);
      return;
    }
    const { series } = answer;
    const p = series.points;
    chart.extras = { windows: series.windows, alarms: series.alarms };
    chart.plot.setData([p.ts_ms.map((t) => t / 1000), p.mean, p.min, p.max]);
    chart.figure.dataset.points = String(p.ts_ms.length);
    const last = p.mean.length ? p.mean[p.mean.length - 1] : null;
    const span = RANGES.find((r) => r.id === state.range).label;
    chart.figure.setAttribute(
      "aria-label",
      `${sensor.name} over the last ${span}: ${p.ts_ms.length} points, ` +
        `last mean ${withUnit(last, series.unit)}`,
    );
    const explains = series.alarms.filter((span) =>
      span.top_sensors.split(",").includes(sensor.name),
    );
    setChildren(
      chart.note,
      p.ts_ms.length
        ? `${p.ts_ms.length} points, one per ${fmtDuration(series.step_ms / 1000)}`
        : "No readings in this range.",
      ...explains.map((span) => {
        const mine = (parseExplanation(span.explanation) || []).filter(
          (c) => c.sensor === sensor.name,
        );
        const why = mine.map((c) => `${c.feature} ${fmt(c.value)} (${expected(c)})`).join("; ");
        return el(
          "span",
          { class: "explains" },
          ` · explains the alarm from ${fmtTime(span.start_ms)}${why ? `: ${why}` : ""}`,
        );
      }),
    );
  }

  function newChart(shown, sensor, width, range) {
    const note = el("p", { class: "chart-note muted" });
    const holder = el("div", { class: "plot" });
    const figure = el(
      "figure",
      { class: "chart", "data-sensor": sensor.name, "data-points": "0", role: "img" },
      [
        el("figcaption", {}, `${sensor.name}${sensor.unit ? ` (${sensor.unit})` : ""}`),
        holder,
        note,
      ],
    );
    shown.parts.charts.append(figure);
    const chart = { figure, note, range, extras: { windows: [], alarms: [] }, plot: null };
    const value = (_u, v) => (v === null || v === undefined ? "—" : fmt(v));
    chart.plot = new uPlot(
      {
        width,
        height: CHART_HEIGHT,
        scales: { x: { time: true, range: () => [chart.range.from, chart.range.to] } },
        series: [
          {},
          { label: "mean", stroke: COLORS.mean, width: 1.5, value },
          { label: "min", stroke: COLORS.edge, width: 1, value },
          { label: "max", stroke: COLORS.edge, width: 1, value },
        ],
        bands: [{ series: [3, 2], fill: COLORS.band }],
        axes: [{}, { size: 56 }],
        cursor: { drag: { x: false, y: false } },
        hooks: { drawClear: [(u) => drawExtras(u, chart.extras)] },
      },
      [[], [], [], []],
      holder,
    );
    return chart;
  }

  // Under the series: alarm spans across the full height, then each window's mean ± std.
  function drawExtras(u, { windows, alarms }) {
    const ctx = u.ctx;
    const { left, top, width, height } = u.bbox;
    const x = (ms) => u.valToPos(ms / 1000, "x", true);
    const y = (v) => u.valToPos(v, "y", true);
    ctx.save();
    ctx.beginPath();
    ctx.rect(left, top, width, height);
    ctx.clip();
    for (const span of alarms) {
      const end = span.end_ms === null ? u.scales.x.max * 1000 : span.end_ms;
      ctx.fillStyle = span.verdict === "rejected" ? COLORS.rejected : COLORS.alarm;
      ctx.fillRect(x(span.start_ms), top, Math.max(2, x(end) - x(span.start_ms)), height);
    }
    for (const w of windows) {
      if (w.mean === null) continue;
      const spread = w.std || 0;
      const x0 = x(w.window_start_ms);
      const x1 = x(w.window_end_ms);
      const y0 = y(w.mean + spread);
      const y1 = y(w.mean - spread);
      ctx.fillStyle = COLORS.window;
      ctx.fillRect(x0, y0, Math.max(1, x1 - x0), Math.max(1, y1 - y0));
      if (w.flagged) {
        ctx.fillStyle = COLORS.flagged;
        ctx.fillRect(x0, top + height - 4, Math.max(2, x1 - x0), 4);
      }
    }
    ctx.restore();
  }

  // -- start ------------------------------------------------------------------------

  $("#auth").addEventListener("submit", signIn);
  window.addEventListener("hashchange", render);
  render();
  connectEvents();
  setInterval(checkHealth, HEALTH_EVERY_MS);
})();
