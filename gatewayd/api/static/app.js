// gatewayd status page: plain JavaScript, no framework, nothing loaded from elsewhere.
//
// Everything shown comes from the control API (/api/v1/...). When the gateway has a token
// (api.token_file) every call carries it as "Authorization: Bearer ..."; the page asks for it
// once, on the first 401, and keeps it in sessionStorage (this tab only). No cookies are used,
// so another site cannot make the browser send commands (no CSRF).
"use strict";

(() => {
  const TOKEN_KEY = "gatewayd.token";
  const STATUS_EVERY_MS = 3000; // plugins, sinks, header
  const DEVICES_EVERY_MS = 5000; // the current devices page
  const CHARTS_EVERY_MS = 10000; // the last hour (the server samples every 10 s)
  const PLUGINS_EVERY_MS = 60000; // command lists change only with a reload
  const TAIL_MAX_LINES = 500;
  const TAIL_RECONNECT_MS = 3000;
  const DEVICES_PAGE = 25;
  const SERIES_COLOURS = ["#1f5fa8", "#d9730d", "#2e8b57", "#9c27b0", "#c62828", "#00838f", "#6d4c41", "#7c8b00"];

  const $ = (id) => document.getElementById(id);

  // --- small DOM and formatting helpers ----------------------------------------------------

  /** An element with properties (className, textContent, title, ...) and children. */
  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === "dataset") Object.assign(node.dataset, value);
      else if (value !== undefined && value !== null) node[key] = value;
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  /** A state badge: the colour comes from data-state in style.css, the text says it too. */
  function badge(state) {
    const text = state === null || state === undefined ? "unknown" : String(state);
    return el("span", { className: "badge", textContent: text, dataset: { state: text.toLowerCase() } });
  }

  function setBadge(node, state) {
    const text = state === null || state === undefined ? "unknown" : String(state);
    node.textContent = text;
    node.dataset.state = text.toLowerCase();
  }

  const numberFormat = new Intl.NumberFormat("en-US");

  function fmtCount(value) {
    return value === null || value === undefined ? "–" : numberFormat.format(value);
  }

  /** Per-second rates: more digits for small values, none for large ones. */
  function fmtRate(value) {
    if (value === null || value === undefined) return "–";
    if (value === 0) return "0";
    const abs = Math.abs(value);
    if (abs < 0.1) return value.toFixed(3);
    if (abs < 10) return value.toFixed(2);
    if (abs < 100) return value.toFixed(1);
    return numberFormat.format(Math.round(value));
  }

  function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
    const s = Math.floor(seconds);
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    if (d) return `${d} d ${h} h`;
    if (h) return `${h} h ${m} min`;
    return `${m} min ${s % 60} s`;
  }

  function fmtTime(iso) {
    if (!iso) return "–";
    const date = new Date(iso);
    return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleString();
  }

  /** How long ago an ISO timestamp was ("4 s ago"); the time itself is in the cell's title. */
  function fmtAgo(iso) {
    if (!iso) return "never";
    const date = new Date(iso);
    if (Number.isNaN(date.getTime())) return String(iso);
    const seconds = Math.max(0, (Date.now() - date.getTime()) / 1000);
    return seconds < 60 ? `${Math.round(seconds)} s ago` : `${fmtDuration(seconds)} ago`;
  }

  /** A device's details as "key: value" pairs, objects as compact JSON. */
  function fmtDetails(details) {
    if (!details || typeof details !== "object") return details === undefined || details === null ? "" : String(details);
    return Object.entries(details)
      .map(([key, value]) => `${key}: ${typeof value === "object" && value !== null ? JSON.stringify(value) : value}`)
      .join(", ");
  }

  function cell(text, className) {
    return el("td", { textContent: text, className });
  }

  function emptyRow(columns, text) {
    return el("tr", { className: "empty" }, el("td", { colSpan: columns, textContent: text }));
  }

  // --- the token and every API call -------------------------------------------------------

  const storedToken = () => sessionStorage.getItem(TOKEN_KEY);
  let tokenWanted = null; // while the token form is open: the promise of the token entered

  /**
   * Open the token form (once for all waiting calls); resolves when a token is entered.
   * 401: the gateway wants a token; 403: the one sent was refused (say so, ask for another).
   */
  function askForToken(status, payload) {
    const message = $("token-message");
    const reason = payload && payload.error && payload.error.message;
    if (status === 403) {
      sessionStorage.removeItem(TOKEN_KEY);
      message.textContent = `The token was refused: ${reason || "not valid"}. Enter another.`;
      message.className = "bad";
    } else if (!tokenWanted) {
      message.textContent = "This gateway needs its API token to show its status.";
      message.className = "";
    }
    if (!tokenWanted) {
      tokenWanted = new Promise((resolve) => {
        const form = $("token-form");
        form.onsubmit = (event) => {
          event.preventDefault();
          const value = $("token-input").value.trim();
          if (!value) return;
          sessionStorage.setItem(TOKEN_KEY, value);
          $("token-input").value = "";
          $("token-panel").hidden = true;
          $("token-button").hidden = false;
          tokenWanted = null;
          resolve(value);
        };
      });
    }
    $("token-panel").hidden = false;
    $("token-input").focus();
    return tokenWanted;
  }

  /**
   * fetch() with the token; on 401/403 asks for a token and tries again. Resolves to the
   * Response of any other status (the caller looks at res.ok).
   */
  async function api(path, options = {}) {
    for (;;) {
      const token = storedToken();
      const headers = Object.assign({ Accept: "application/json" }, options.headers || {});
      if (token) headers.Authorization = `Bearer ${token}`;
      const res = await fetch(path, { ...options, headers, cache: "no-store", credentials: "omit" });
      if (res.status !== 401 && res.status !== 403) return res;
      const payload = await res.json().catch(() => null);
      if (storedToken() !== token) continue; // another call already got a new token
      await askForToken(res.status, payload);
    }
  }

  /** GET a JSON document; throws an Error naming the status and the API's message. */
  async function getJson(path) {
    const res = await api(path);
    const payload = await res.json().catch(() => null);
    if (!res.ok) {
      const error = payload && payload.error;
      throw new Error(error ? `${res.status} ${error.code}: ${error.message}` : `HTTP ${res.status}`);
    }
    return payload;
  }

  /**
   * Run ``task`` now and then every ``ms`` after it finished (never two at once). While the tab
   * is hidden the task is skipped, so a forgotten tab costs the box nothing but the tail.
   */
  function every(ms, task) {
    const run = async () => {
      try {
        if (!document.hidden) await task();
      } catch (error) {
        showProblem(error);
      }
      setTimeout(run, ms);
    };
    run();
  }

  function showProblem(error) {
    const banner = $("banner");
    banner.textContent = `Cannot reach the gateway: ${error.message || error}. Retrying…`;
    banner.hidden = false;
  }

  function clearProblem() {
    $("banner").hidden = true;
  }

  // --- header, plugins and sinks (GET /api/v1/status) --------------------------------------

  async function refreshStatus() {
    const status = await getJson("/api/v1/status");
    clearProblem();
    $("gateway-id").textContent = status.gateway || "gatewayd";
    document.title = `${status.gateway || "gatewayd"} – gatewayd`;
    setBadge($("box-status"), status.status);
    $("version").textContent = status.version || "–";
    $("uptime").textContent = fmtDuration(status.uptime_seconds);
    $("config").textContent = describeConfig(status.config);
    $("config").title = $("config").textContent; // cut short in the header, whole on hover
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    renderPlugins(status.plugins || {});
    renderSinks(status.sinks || {});
    knownPlugins(Object.keys(status.plugins || {}));
  }

  /** The config file, when it was loaded, and how the last reload went (if there was one). */
  function describeConfig(config) {
    if (!config) return "–";
    let text = `${config.path} (loaded ${fmtTime(config.loaded_at)})`;
    const reload = config.last_reload;
    if (reload) {
      const errors = reload.errors || [];
      const failed = Object.entries(reload.failed || {});
      const restart = reload.needs_restart || [];
      let outcome = "applied";
      if (reload.ok === false) outcome = `refused: ${errors[0] || "see the log"}${errors.length > 1 ? ` (+${errors.length - 1} more)` : ""}`;
      else if (failed.length) outcome = `partly applied: ${failed.map(([name, why]) => `${name}: ${why}`).join("; ")}`;
      text += `; last reload ${fmtTime(reload.at)} ${outcome}`;
      if (restart.length) text += `; needs a restart for ${restart.join(", ")}`;
    }
    return text;
  }

  function renderPlugins(plugins) {
    const body = $("plugins").tBodies[0];
    const rows = Object.keys(plugins).sort().map((name) => {
      const p = plugins[name];
      const rates = p.rates || {};
      return el("tr", { dataset: { plugin: name } },
        cell(name), cell(p.type),
        el("td", {}, badge(p.state)),
        cell(fmtCount(p.devices_online), "num"),
        cell(fmtRate(rates.events), "num"),
        cell(fmtRate(rates.frames_in), "num"),
        cell(fmtRate(rates.frames_out), "num"),
        cell(fmtRate(rates.frames_invalid), "num"),
        cell(fmtCount(p.restarts), "num"),
        cell(p.error || "", "error"));
    });
    body.replaceChildren(...(rows.length ? rows : [emptyRow(10, "no plugins configured")]));
  }

  /** The sink's last error: red while it fails, grey with "recovered" once it healed. */
  function lastErrorCell(s, queue) {
    if (queue.error) return cell(queue.error, "error");
    if (s.warning) return cell(s.warning, "error");
    if (!s.last_error) return cell("");
    if (s.recovered_at && s.state === "ok") {
      return cell(`recovered ${s.recovered_at}: ${s.last_error}`, "healed");
    }
    return cell(s.last_error, "error");
  }

  function renderSinks(sinks) {
    const body = $("sinks").tBodies[0];
    const rows = Object.keys(sinks).sort().map((name) => {
      const s = sinks[name];
      const queue = s.queue || {};
      const state = el("td", {}, badge(s.state));
      if (queue.state && queue.state !== s.state && queue.state !== "ok") {
        state.append(" ", badge(`queue ${queue.state}`));
      }
      if (queue.failing_seconds) state.append(` for ${fmtDuration(queue.failing_seconds)}`);
      return el("tr", { dataset: { sink: name } },
        cell(name), cell(s.type), state,
        cell(fmtCount(s.queued), "num"),
        cell(fmtDuration(s.oldest_age_seconds), "num"),
        cell(fmtRate(s.delivery_rate), "num"),
        cell(fmtCount(s.delivered), "num"),
        lastErrorCell(s, queue));
    });
    body.replaceChildren(...(rows.length ? rows : [emptyRow(8, "no sinks configured")]));
  }

  // --- devices (GET /api/v1/devices, paged on the server) ----------------------------------

  const devices = { offset: 0, next: null, timer: null, generation: 0 };

  function knownPlugins(names) {
    const select = $("devices-plugin");
    const have = [...select.options].slice(1).map((o) => o.value);
    if (have.join("\n") === [...names].sort().join("\n")) return;
    const chosen = select.value;
    select.replaceChildren(el("option", { value: "", textContent: "all plugins" }),
      ...[...names].sort().map((n) => el("option", { value: n, textContent: n })));
    select.value = names.includes(chosen) ? chosen : "";
  }

  async function refreshDevices() {
    const generation = ++devices.generation; // a later request wins over a slow earlier one
    const query = new URLSearchParams({ limit: String(DEVICES_PAGE), offset: String(devices.offset) });
    const search = $("devices-search").value.trim();
    if (search) query.set("search", search);
    if ($("devices-plugin").value) query.set("plugin", $("devices-plugin").value);
    if ($("devices-online").value) query.set("online", $("devices-online").value);
    const body = $("devices").tBodies[0];
    let page;
    try {
      page = await getJson(`/api/v1/devices?${query}`);
    } catch (error) {
      if (generation === devices.generation) body.replaceChildren(emptyRow(5, `cannot list devices: ${error.message}`));
      return;
    }
    if (generation !== devices.generation) return;
    const rows = page.devices.map((d) => el("tr", { dataset: { plugin: d.plugin, device: d.id } },
      cell(d.plugin), cell(d.id, "id"),
      el("td", {}, badge(d.online ? "online" : "offline")),
      el("td", { className: "age", textContent: fmtAgo(d.last_seen), title: fmtTime(d.last_seen) }),
      cell(fmtDetails(d.details), "details")));
    for (const [plugin, message] of Object.entries(page.errors || {})) {
      rows.push(emptyRow(5, `${plugin}: ${message}`));
    }
    body.replaceChildren(...(rows.length ? rows : [emptyRow(5, "no devices match")]));
    const shown = page.devices.length;
    $("devices-range").textContent = shown
      ? `${page.offset + 1}–${page.offset + shown}${page.next_offset === null ? "" : " …"}`
      : "";
    // Each row's details are shown whole on hover.
    for (const row of body.rows) {
      const details = row.querySelector("td.details");
      if (details) details.title = details.textContent;
    }
    devices.next = page.next_offset;
    $("devices-prev").disabled = page.offset === 0;
    $("devices-next").disabled = page.next_offset === null;
  }

  /** A filter changed: back to the first page, after the user stopped typing for a moment. */
  function devicesFilterChanged(delay) {
    clearTimeout(devices.timer);
    devices.timer = setTimeout(() => {
      devices.offset = 0;
      refreshDevices();
    }, delay);
  }

  function setUpDevices() {
    $("devices-form").addEventListener("submit", (event) => event.preventDefault());
    $("devices-search").addEventListener("input", () => devicesFilterChanged(250));
    $("devices-plugin").addEventListener("change", () => devicesFilterChanged(0));
    $("devices-online").addEventListener("change", () => devicesFilterChanged(0));
    $("devices-prev").addEventListener("click", () => {
      devices.offset = Math.max(0, devices.offset - DEVICES_PAGE);
      refreshDevices();
    });
    $("devices-next").addEventListener("click", () => {
      if (devices.next === null) return;
      devices.offset = devices.next;
      refreshDevices();
    });
  }

  // --- charts of the last hour (GET /api/v1/history), drawn on canvas ----------------------

  /** Stable colours: a series keeps its colour as long as the set of names does not change. */
  function colourIndex(names, name) {
    return [...names].sort().indexOf(name) % SERIES_COLOURS.length;
  }

  async function refreshCharts() {
    const history = await getJson("/api/v1/history");
    const t = history.t || [];
    const plugins = history.plugins || {};
    const sinks = history.sinks || {};
    const pick = (group, field) => Object.fromEntries(
      Object.entries(group).map(([name, series]) => [name, series[field] || []]));
    drawChart("events", t, pick(plugins, "events"), fmtRate);
    drawChart("frames", t, pick(plugins, "frames_in"), fmtRate);
    drawChart("queues", t, pick(sinks, "queued"), fmtCount);
    const minutes = Math.round(((history.interval || 10) * (history.points || 360)) / 60);
    $("charts-note").textContent = t.length
      ? `(${t.length} samples, one every ${history.interval} s; the last ${minutes} min are kept)`
      : "(no samples yet)";
  }

  /**
   * One line per series over the time axis ``t`` (posix seconds); null values leave gaps.
   * The y axis runs from 0 to a little above the largest value.
   */
  function drawChart(id, t, series, format) {
    const canvas = $(`chart-${id}`);
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || 400, height = canvas.clientHeight || 150;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const names = Object.keys(series);
    const pad = { left: 44, right: 8, top: 8, bottom: 18 };
    const plotW = width - pad.left - pad.right, plotH = height - pad.top - pad.bottom;

    let max = 0;
    for (const name of names) for (const v of series[name]) if (v !== null && v > max) max = v;
    max = niceCeiling(max);
    // The window is the last hour once there is an hour of samples; before that it spans the
    // samples there are (at least five minutes), so a fresh start is not a dot at the right edge.
    const tEnd = t.length ? t[t.length - 1] : Date.now() / 1000;
    const span = Math.min(3600, Math.max(300, t.length ? tEnd - t[0] : 0));
    const tStart = tEnd - span;
    const x = (ts) => pad.left + ((ts - tStart) / span) * plotW;
    const y = (v) => pad.top + plotH - (v / max) * plotH;

    // grid and axis labels: 0, half and max; the last hour in 15-minute steps
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#66707a";
    ctx.strokeStyle = "#e3e7eb";
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (const v of [0, max / 2, max]) {
      ctx.beginPath();
      ctx.moveTo(pad.left, Math.round(y(v)) + 0.5);
      ctx.lineTo(width - pad.right, Math.round(y(v)) + 0.5);
      ctx.stroke();
      ctx.fillText(format(v), pad.left - 4, y(v));
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    const step = span > 1800 ? 15 : span > 600 ? 5 : 1; // minutes between time labels
    for (let minutes = Math.floor(span / 60 / step) * step; minutes >= 0; minutes -= step) {
      const label = minutes ? `-${minutes} min` : "now";
      ctx.fillText(label, Math.min(Math.max(x(tEnd - minutes * 60), pad.left + 20), width - 16), pad.top + plotH + 4);
    }

    // the series: a line through each run of known values, a dot for a value alone
    ctx.lineWidth = 1.5;
    ctx.lineJoin = "round";
    const known = (values, i) => i >= 0 && i < values.length && values[i] !== null && values[i] !== undefined && t[i] >= tStart;
    for (const name of names) {
      const values = series[name];
      const colour = SERIES_COLOURS[colourIndex(names, name)];
      ctx.strokeStyle = colour;
      ctx.fillStyle = colour;
      ctx.beginPath();
      values.forEach((v, i) => {
        if (!known(values, i)) return;
        if (known(values, i - 1)) ctx.lineTo(x(t[i]), y(v));
        else ctx.moveTo(x(t[i]), y(v));
        if (!known(values, i - 1) && !known(values, i + 1)) ctx.fillRect(x(t[i]) - 2, y(v) - 2, 4, 4);
      });
      ctx.stroke();
    }
    ctx.fillStyle = "#66707a";
    if (!t.length) {
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      ctx.fillText("no samples yet", pad.left + plotW / 2, pad.top + plotH / 2);
    }

    $(`legend-${id}`).replaceChildren(...names.sort().map((name) => el("span", {},
      el("span", { className: `swatch c${colourIndex(names, name)}` }), name)));
  }

  /** The smallest 1, 2 or 5 times a power of ten that is at least ``value`` (1 for nothing). */
  function niceCeiling(value) {
    if (!(value > 0)) return 1;
    const power = 10 ** Math.floor(Math.log10(value));
    for (const step of [1, 2, 5]) if (value <= step * power) return step * power;
    return 10 * power;
  }

  // --- command forms, built from each command's JSON schema --------------------------------

  let commandsSignature = "";

  async function refreshCommands() {
    const listing = await getJson("/api/v1/plugins");
    const plugins = listing.plugins || [];
    // Rebuilt only when a plugin or command changed, so typing is never thrown away.
    const signature = JSON.stringify(plugins.map((p) => [p.name, p.commands]));
    if (signature === commandsSignature) return;
    commandsSignature = signature;
    const cards = plugins.filter((p) => (p.commands || []).length).map(commandCard);
    $("commands").replaceChildren(...(cards.length ? cards : [el("p", { className: "muted", textContent: "no plugin has commands" })]));
  }

  function commandCard(plugin) {
    const select = el("select", { name: "command", ariaLabel: `${plugin.name} command` },
      ...plugin.commands.map((c) => el("option", { value: c.name, textContent: c.name })));
    const doc = el("p", { className: "doc" });
    const fields = el("div", { className: "fields" });
    const answer = el("pre", { className: "answer", hidden: true });
    const send = el("button", { type: "submit", textContent: "Send" });
    const form = el("form", { className: "command-card", dataset: { plugin: plugin.name } },
      el("h3", {}, plugin.name, el("span", { className: "muted", textContent: plugin.type })),
      el("div", { className: "fields" }, el("label", { textContent: "command" }), select),
      doc, fields,
      el("div", { className: "command-actions" }, send),
      answer);
    let current = null;
    const choose = () => {
      current = plugin.commands.find((c) => c.name === select.value);
      doc.textContent = current.doc || "";
      fields.replaceChildren(...schemaFields(current.arguments));
      answer.hidden = true;
    };
    select.addEventListener("change", choose);
    choose();
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      let args;
      try {
        args = collectArguments(fields);
      } catch (error) {
        showAnswer(answer, false, error.message);
        return;
      }
      send.disabled = true;
      showAnswer(answer, null, `sending ${plugin.name} ${current.name} ${JSON.stringify(args)} …`);
      try {
        const path = `/api/v1/plugins/${encodeURIComponent(plugin.name)}/commands/${encodeURIComponent(current.name)}`;
        const res = await api(path, {
          method: "POST",
          headers: { "Content-Type": "application/json" },
          body: JSON.stringify(args),
        });
        const payload = await res.json().catch(() => null);
        const good = res.ok && payload && payload.ok !== false;
        const head = good ? `${res.status} ok` : `${res.status} ${payload && payload.error ? `${payload.error.code}: ${payload.error.message}` : "error"}`;
        showAnswer(answer, good, `${head}\n${JSON.stringify(good ? payload.result : payload, null, 2)}`);
      } catch (error) {
        showAnswer(answer, false, `not sent: ${error.message}`);
      } finally {
        send.disabled = false;
      }
    });
    return form;
  }

  function showAnswer(node, good, text) {
    node.hidden = false;
    node.className = `answer${good === true ? " good" : good === false ? " bad" : ""}`;
    node.textContent = text;
  }

  /** Follow a local "$ref" (#/$defs/Name) and a one-element allOf, as pydantic writes them. */
  function resolveSchema(schema, root) {
    let s = schema || {};
    for (let depth = 0; depth < 8; depth++) {
      if (s.$ref && s.$ref.startsWith("#/")) {
        const target = s.$ref.slice(2).split("/").reduce((node, key) => (node ? node[key] : undefined), root);
        const { $ref, ...rest } = s;
        s = { ...(target || {}), ...rest };
      } else if (Array.isArray(s.allOf) && s.allOf.length === 1) {
        const { allOf, ...rest } = s;
        s = { ...allOf[0], ...rest };
      } else break;
    }
    return s;
  }

  /**
   * What input a property needs: {kind: "string"|"integer"|"number"|"boolean"|"enum"|"json"}.
   * ``X | None`` (anyOf with null) is the input of X; anything else complex is JSON text.
   */
  function fieldKind(property, root) {
    let s = resolveSchema(property, root);
    if (Array.isArray(s.anyOf) || Array.isArray(s.oneOf)) {
      const options = (s.anyOf || s.oneOf).map((o) => resolveSchema(o, root)).filter((o) => o.type !== "null");
      if (options.length !== 1) return { kind: "json", schema: s };
      s = { ...options[0], description: s.description ?? options[0].description, default: s.default };
    }
    let type = s.type;
    if (Array.isArray(type)) {
      const kinds = type.filter((k) => k !== "null");
      type = kinds.length === 1 ? kinds[0] : undefined;
    }
    if (Array.isArray(s.enum)) return { kind: "enum", schema: s };
    if (s.const !== undefined) return { kind: "enum", schema: { ...s, enum: [s.const] } };
    if (["string", "integer", "number", "boolean"].includes(type)) return { kind: type, schema: s };
    return { kind: "json", schema: s };
  }

  /** Label, input and hint for every property of an arguments schema. */
  function schemaFields(schema) {
    if (!schema || !schema.properties || !Object.keys(schema.properties).length) {
      return [el("span", { className: "muted", textContent: "no arguments" })];
    }
    const required = new Set(schema.required || []);
    const nodes = [];
    for (const [name, property] of Object.entries(schema.properties)) {
      const { kind, schema: s } = fieldKind(property, schema);
      const isRequired = required.has(name);
      const id = `arg-${Math.random().toString(36).slice(2, 9)}`;
      let input;
      if (kind === "enum" || kind === "boolean") {
        const values = kind === "boolean" ? [true, false] : s.enum;
        input = el("select", {}, el("option", { value: "", textContent: isRequired ? "choose…" : "(not given)" }),
          ...values.map((v) => el("option", { value: JSON.stringify(v), textContent: String(v) })));
      } else if (kind === "json") {
        input = el("textarea", { rows: 2, placeholder: "JSON" });
      } else {
        input = el("input", { type: kind === "string" ? "text" : "number", spellcheck: false });
        if (kind === "integer") input.step = "1";
        if (kind === "number") input.step = "any";
        if (s.minimum !== undefined) input.min = s.minimum;
        if (s.maximum !== undefined) input.max = s.maximum;
        if (s.maxLength !== undefined) input.maxLength = s.maxLength;
      }
      input.id = id;
      input.name = name;
      input.required = isRequired;
      input.dataset.kind = kind;
      if (s.default !== undefined && s.default !== null && "placeholder" in input) {
        input.placeholder = `default ${JSON.stringify(s.default)}`;
      }
      const label = el("label", { htmlFor: id }, name, isRequired ? el("span", { className: "req", textContent: " *" }) : null);
      nodes.push(label, input);
      const hint = [s.title !== name && s.description ? s.description : null, rangeHint(s)].filter(Boolean).join("; ");
      if (hint) nodes.push(el("span", { className: "hint", textContent: hint }));
    }
    return nodes;
  }

  function rangeHint(s) {
    const low = s.minimum ?? (s.exclusiveMinimum !== undefined ? `>${s.exclusiveMinimum}` : undefined);
    const high = s.maximum ?? (s.exclusiveMaximum !== undefined ? `<${s.exclusiveMaximum}` : undefined);
    if (low === undefined && high === undefined) return "";
    return `range ${low ?? "…"} to ${high ?? "…"}`;
  }

  /** The arguments object from the fields; empty fields are left out (the server's defaults). */
  function collectArguments(fields) {
    const args = {};
    for (const input of fields.querySelectorAll("[data-kind]")) {
      const text = input.value.trim();
      if (text === "") {
        if (input.required) throw new Error(`${input.name} is required`);
        continue;
      }
      switch (input.dataset.kind) {
        case "integer":
        case "number": {
          const value = Number(text);
          if (!Number.isFinite(value) || (input.dataset.kind === "integer" && !Number.isInteger(value))) {
            throw new Error(`${input.name}: ${text} is not ${input.dataset.kind === "integer" ? "a whole number" : "a number"}`);
          }
          args[input.name] = value;
          break;
        }
        case "enum":
        case "boolean":
          args[input.name] = JSON.parse(input.value);
          break;
        case "json":
          try {
            args[input.name] = JSON.parse(text);
          } catch (error) {
            throw new Error(`${input.name}: not valid JSON (${error.message})`);
          }
          break;
        default:
          args[input.name] = input.value;
      }
    }
    return args;
  }

  // --- live tail (GET /api/v1/events/stream, Server-Sent Events read with fetch) -----------

  // EventSource cannot send an Authorization header, so the stream is read with fetch() and
  // parsed here: blocks separated by a blank line; "data:" lines, "event:" and ":" comments.
  const tail = { controller: null, paused: false, held: [], shown: 0, timer: null };

  function tailQuery() {
    const query = new URLSearchParams();
    for (const field of ["plugin", "type", "device"]) {
      const value = $(`tail-${field}`).value.trim();
      if (value) query.set(field, value);
    }
    return query.toString();
  }

  function restartTail(delay = 0) {
    if (tail.controller) tail.controller.abort();
    tail.controller = null;
    clearTimeout(tail.timer);
    tail.timer = setTimeout(runTail, delay);
  }

  async function runTail() {
    const controller = new AbortController();
    tail.controller = controller;
    setBadge($("tail-state"), "connecting");
    let reason = "the stream ended";
    try {
      const query = tailQuery();
      const res = await api(`/api/v1/events/stream${query ? `?${query}` : ""}`, {
        signal: controller.signal,
        headers: { Accept: "text/event-stream" },
      });
      if (!res.ok) {
        const payload = await res.json().catch(() => null);
        reason = payload && payload.error ? payload.error.message : `HTTP ${res.status}`;
        throw new Error(reason);
      }
      setBadge($("tail-state"), tail.paused ? "paused" : "live");
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const dropped = handleSseBlock(block);
          if (dropped) reason = dropped;
        }
      }
    } catch (error) {
      if (controller.signal.aborted) return; // a filter changed: a new stream is on its way
      reason = error.message || String(error);
    }
    if (tail.controller !== controller) return;
    setBadge($("tail-state"), "reconnecting");
    tailNotice(`stream interrupted (${reason}); reconnecting in ${TAIL_RECONNECT_MS / 1000} s`);
    restartTail(TAIL_RECONNECT_MS);
  }

  /** One SSE block: an event line in the tail; returns the reason of an "error" event. */
  function handleSseBlock(block) {
    let type = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line === "" || line.startsWith(":")) continue; // comments: connected, keepalive
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") type = value;
      else if (field === "data") data.push(value);
    }
    if (!data.length) return null;
    let payload;
    try {
      payload = JSON.parse(data.join("\n"));
    } catch {
      return null;
    }
    if (type === "error") {
      const reason = `the gateway dropped the stream: ${payload.reason || payload.message || "no reason given"}`;
      return reason;
    }
    if (tail.paused) {
      tail.held.push(payload);
      if (tail.held.length > TAIL_MAX_LINES) tail.held.shift();
      updateTailCount();
    } else {
      addTailLine(payload);
    }
    return null;
  }

  function addTailLine(event) {
    const list = $("tail");
    const ts = event.ts ? new Date(event.ts) : null;
    const time = ts && !Number.isNaN(ts.getTime())
      ? `${ts.toLocaleTimeString("en-GB", { hour12: false })}.${String(ts.getMilliseconds()).padStart(3, "0")}`
      : "";
    const data = event.data === undefined || event.data === null ? "" : JSON.stringify(event.data);
    const type = String(event.type || "");
    const line = el("li", {
      className: type.includes("invalid") || type.includes("error") ? "invalid" : "",
      dataset: { plugin: event.plugin || "", type, device: event.device || "" },
    },
      el("span", { className: "time", textContent: time }),
      el("span", { className: "plugin", textContent: event.plugin || "" }),
      el("span", { className: "device", textContent: event.device || "", title: event.device || "" }),
      el("span", { className: "type", textContent: type }),
      el("span", { className: "data", textContent: data, title: data }));
    list.prepend(line);
    while (list.children.length > TAIL_MAX_LINES) list.lastElementChild.remove();
    tail.shown += 1;
    updateTailCount();
  }

  function tailNotice(text) {
    const list = $("tail");
    list.prepend(el("li", { className: "notice", textContent: `${new Date().toLocaleTimeString()} ${text}` }));
    while (list.children.length > TAIL_MAX_LINES) list.lastElementChild.remove();
  }

  function updateTailCount() {
    const held = tail.held.length ? `, ${tail.held.length} held while paused` : "";
    $("tail-count").textContent = `${tail.shown} events${held}`;
  }

  function setUpTail() {
    $("tail-form").addEventListener("submit", (event) => {
      event.preventDefault();
      restartTail();
    });
    for (const field of ["plugin", "type", "device"]) {
      $(`tail-${field}`).addEventListener("input", () => restartTail(400));
    }
    $("tail-pause").addEventListener("click", () => {
      tail.paused = !tail.paused;
      $("tail-pause").textContent = tail.paused ? "Resume" : "Pause";
      if (!tail.paused) {
        for (const event of tail.held.splice(0)) addTailLine(event);
      }
      if (tail.controller) setBadge($("tail-state"), tail.paused ? "paused" : "live");
      updateTailCount();
    });
    $("tail-clear").addEventListener("click", () => {
      $("tail").replaceChildren();
      tail.shown = 0;
      tail.held = [];
      updateTailCount();
    });
  }

  // --- start ----------------------------------------------------------------------------

  function start() {
    $("token-button").hidden = !storedToken();
    $("token-button").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      location.reload();
    });
    setUpDevices();
    setUpTail();
    every(STATUS_EVERY_MS, refreshStatus);
    every(DEVICES_EVERY_MS, refreshDevices);
    every(CHARTS_EVERY_MS, refreshCharts);
    every(PLUGINS_EVERY_MS, refreshCommands);
    runTail();
    // Back in view: refresh at once rather than at the next tick.
    document.addEventListener("visibilitychange", () => {
      if (document.hidden) return;
      for (const task of [refreshStatus, refreshDevices, refreshCharts]) task().catch(showProblem);
    });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
