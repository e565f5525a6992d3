// The operations page: devices and areas on a map, open alarms with acknowledge buttons and an area
// filter, per-domain summary tiles, a device's panel with its last day in charts, live over the API's
// event stream. Plain JavaScript, no build step; Leaflet and uPlot are vendored.
//
// The API key comes from the URL fragment (`/#key=...`, never sent to the server), is kept in
// sessionStorage and sent as `X-API-Key`. EventSource cannot send headers, so the stream is read
// with fetch() and parsed here; when it is unavailable the page polls.
"use strict";

(() => {
  const STORE = {
    key: "ioc.apiKey",
    lang: "ioc.lang",
    city: "ioc.city",
    hidden: "ioc.hiddenDomains",
    hiddenKinds: "ioc.hiddenAreaKinds",
  };
  const LANGS = ["vi", "en"];
  const SEVERITIES = ["critical", "high", "medium", "low"];
  const RANK = { low: 1, medium: 2, high: 3, critical: 4 };
  const STATUSES = ["online", "offline", "unknown"];
  const POLL_MS = 10000; // without the stream
  const POLL_LIVE_MS = 60000; // with the stream, as a safety net
  const STREAM_IDLE_MS = 45000; // no byte (not even a heartbeat) for this long: reconnect
  const STREAM_MISSING_MS = 60000; // the API has no stream (404/501): try again this much later
  const ALARM_PAGE = 200;
  // Areas, bottom to top: the province is the outer outline, wards are filled by their worst open
  // alarm, and the engineers' areas (catchments, zones) are dashed outlines over them.
  const AREA_KINDS = ["province", "ward", "catchment", "pressure_zone", "feeder_zone", "custom"];
  const FILLED_KINDS = new Set(["ward"]);
  // A device's panel: its last day in 15-minute averages, reloaded while open at most this often.
  const CHART_HOURS = 24;
  const CHART_BUCKET_MS = 15 * 60 * 1000;
  const CHART_BUCKET = "15m";
  const PANEL_RELOAD_MS = 5 * 60 * 1000;
  const LIMIT_KEYS = ["crit_above", "warn_above", "warn_below", "crit_below"];

  const TEXT = {
    vi: {
      title: "Trung tâm điều hành",
      city: "Thành phố",
      forget_key: "Đổi khoá",
      summary: "Tổng quan theo lĩnh vực",
      map: "Bản đồ thiết bị",
      layers: "Lớp bản đồ",
      legend: "Chú giải",
      alarms: "Cảnh báo đang mở",
      no_alarms: "Không có cảnh báo nào đang mở.",
      more_alarms: "Còn những cảnh báo khác không hiển thị.",
      key_title: "Nhập khoá API",
      key_help:
        "Trang này cần một khoá API để đọc dữ liệu. Khoá chỉ được giữ trong thẻ trình duyệt này.",
      key_label: "Khoá API",
      key_submit: "Mở",
      conn_connecting: "Đang kết nối…",
      conn_live: "Trực tiếp",
      conn_polling: "Cập nhật mỗi 10 giây",
      conn_down: "Mất kết nối",
      status_online: "Trực tuyến",
      status_offline: "Mất kết nối",
      status_unknown: "Chưa rõ",
      sev_critical: "Nguy hiểm",
      sev_high: "Cao",
      sev_medium: "Trung bình",
      sev_low: "Thấp",
      state_active: "Chưa xác nhận",
      state_acknowledged: "Đã xác nhận",
      ack: "Xác nhận",
      acking: "Đang xác nhận…",
      locate: "Xem trên bản đồ",
      devices_online: "{online}/{total} thiết bị trực tuyến",
      offline_n: "{n} mất kết nối",
      unknown_n: "{n} chưa rõ",
      alarms_none: "Không có cảnh báo",
      acknowledged_n: "{n} đã xác nhận",
      status: "Trạng thái",
      district: "Quận/huyện",
      last_reading: "Lần đọc cuối",
      never: "chưa có",
      open_alarms: "Cảnh báo mở",
      area_alarm: "Cảnh báo ngập toàn khu vực",
      repeats: "{n} lần",
      started: "Từ {time}",
      acked_at: "xác nhận lúc {time}",
      no_cities: "Chưa có thành phố nào có thiết bị trong phạm vi của khoá này.",
      err_key: "Khoá API không hợp lệ hoặc đã bị thu hồi.",
      err_unreachable: "Không kết nối được tới máy chủ; đang thử lại…",
      err_forbidden_ack: "Khoá này không có quyền xác nhận cảnh báo (cần vai trò operator).",
      err_resolved: "Cảnh báo đã được giải quyết trước khi xác nhận.",
      err_generic: "Lỗi {status}: {detail}",
      show_layer: "Hiện/ẩn lớp {domain}",
      area_layers: "Lớp khu vực",
      show_area_layer: "Hiện/ẩn lớp {kind}",
      area_filter: "Khu vực",
      all_areas: "Tất cả khu vực",
      kind_province: "Tỉnh/thành phố",
      kind_ward: "Phường/xã",
      kind_catchment: "Lưu vực thoát nước",
      kind_pressure_zone: "Vùng áp lực cấp nước",
      kind_feeder_zone: "Vùng lộ xuất tuyến",
      kind_custom: "Khu vực khác",
      approximate: "ranh giới gần đúng",
      devices: "Thiết bị",
      devices_total: "Tổng số",
      no_devices_here: "Không có thiết bị nào trong khu vực này.",
      also_here: "Cũng tại đây",
      filter_here: "Chỉ xem cảnh báo của khu vực này",
      close: "Đóng",
      areas: "Khu vực",
      loading: "Đang tải…",
      last_day: "24 giờ qua (trung bình 15 phút)",
      no_readings: "Không có số đo nào trong 24 giờ qua.",
      series_failed: "Không tải được số liệu: {detail}",
      device_failed: "Không tải được thiết bị: {detail}",
      no_open_alarms: "Không có cảnh báo mở.",
      limits: "Ngưỡng",
      limit_warn_above: "Cảnh báo trên",
      limit_crit_above: "Nguy hiểm trên",
      limit_warn_below: "Cảnh báo dưới",
      limit_crit_below: "Nguy hiểm dưới",
      no_limits: "không có",
      alarm_marks: "▲ Cảnh báo bắt đầu: {list}",
      time: "Thời gian",
    },
    en: {
      title: "Operations center",
      city: "City",
      forget_key: "Change key",
      summary: "Summary by domain",
      map: "Device map",
      layers: "Map layers",
      legend: "Legend",
      alarms: "Open alarms",
      no_alarms: "No open alarms.",
      more_alarms: "More alarms are open than are shown.",
      key_title: "Enter an API key",
      key_help: "This page needs an API key to read data. The key is kept in this browser tab only.",
      key_label: "API key",
      key_submit: "Open",
      conn_connecting: "Connecting…",
      conn_live: "Live",
      conn_polling: "Updating every 10 s",
      conn_down: "Disconnected",
      status_online: "Online",
      status_offline: "Offline",
      status_unknown: "Unknown",
      sev_critical: "Critical",
      sev_high: "High",
      sev_medium: "Medium",
      sev_low: "Low",
      state_active: "Not acknowledged",
      state_acknowledged: "Acknowledged",
      ack: "Acknowledge",
      acking: "Acknowledging…",
      locate: "Show on map",
      devices_online: "{online}/{total} devices online",
      offline_n: "{n} offline",
      unknown_n: "{n} unknown",
      alarms_none: "No alarms",
      acknowledged_n: "{n} acknowledged",
      status: "Status",
      district: "District",
      last_reading: "Last reading",
      never: "none yet",
      open_alarms: "Open alarms",
      area_alarm: "Area-wide flood alarm",
      repeats: "{n} times",
      started: "Since {time}",
      acked_at: "acknowledged at {time}",
      no_cities: "No city has devices within this key's scope yet.",
      err_key: "The API key is not valid or was revoked.",
      err_unreachable: "Cannot reach the server; retrying…",
      err_forbidden_ack: "This key may not acknowledge alarms (the operator role is needed).",
      err_resolved: "The alarm was resolved before it could be acknowledged.",
      err_generic: "Error {status}: {detail}",
      show_layer: "Show or hide the {domain} layer",
      area_layers: "Area layers",
      show_area_layer: "Show or hide the {kind} layer",
      area_filter: "Area",
      all_areas: "All areas",
      kind_province: "Province",
      kind_ward: "Ward/commune",
      kind_catchment: "Drainage catchment",
      kind_pressure_zone: "Water pressure zone",
      kind_feeder_zone: "Feeder zone",
      kind_custom: "Other area",
      approximate: "approximate boundary",
      devices: "Devices",
      devices_total: "Total",
      no_devices_here: "No devices in this area.",
      also_here: "Also here",
      filter_here: "Show this area's alarms only",
      close: "Close",
      areas: "Areas",
      loading: "Loading…",
      last_day: "Last 24 hours (15-minute averages)",
      no_readings: "No readings in the last 24 hours.",
      series_failed: "Could not load the readings: {detail}",
      device_failed: "Could not load the device: {detail}",
      no_open_alarms: "No open alarms.",
      limits: "Limits",
      limit_warn_above: "Warning above",
      limit_crit_above: "Critical above",
      limit_warn_below: "Warning below",
      limit_crit_below: "Critical below",
      no_limits: "none",
      alarm_marks: "▲ Alarms started: {list}",
      time: "Time",
    },
  };

  const CONFIG = readConfig();
  const DOMAIN_META = new Map(CONFIG.domains.map((d) => [d.name, d]));
  const DOMAIN_NAMES = CONFIG.domains.map((d) => d.name);

  const state = {
    key: null,
    lang: LANGS.includes(localStorage.getItem(STORE.lang)) ? localStorage.getItem(STORE.lang) : "vi",
    cities: [],
    city: null,
    generation: 0, // bumped on every city change or stop: late answers of older ones are dropped
    devices: new Map(), // device id -> {props, marker}
    alarms: new Map(), // alarm id -> alarm
    alarmsMore: false,
    summary: null,
    hidden: new Set(readJson(localStorage.getItem(STORE.hidden), [])),
    hiddenKinds: new Set(readJson(localStorage.getItem(STORE.hiddenKinds), [])),
    map: null,
    groups: new Map(), // domain -> L.LayerGroup
    areas: new Map(), // area id -> {id, kind, props, geometry, bbox, state, layer}
    areaGroups: new Map(), // area kind -> L.GeoJSON
    areasLoaded: false, // the city's geometries are drawn
    areasEtag: null, // of the last answer of the areas' state
    areaPopup: null, // {popup, id, here: [area ids at the clicked point]}; one popup, reused
    alarmArea: "", // the alarm list's area filter; "" for every area
    panel: null, // the device panel: {id, token, device, alarms, past, series, from, to, loadedAt, plots}
    panelToken: 0,
    fitted: false,
    userMoved: false,
    live: false,
    lastEventId: null,
    retryBaseMs: 1000, // the stream's `retry:` field, or 1 s
    retryMs: 1000, // the next reconnection delay: doubles on each failure, back to the base on an event
    streamAbort: null,
    pollTimer: null,
    pollDue: 0,
    refreshTimer: null,
    pending: new Set(),
    noticeKey: null,
  };

  const $ = (selector) => document.querySelector(selector);

  // ------------------------------------------------------------------ helpers

  function readJson(text, fallback) {
    try {
      const value = JSON.parse(text);
      return value ?? fallback;
    } catch {
      return fallback;
    }
  }

  function readConfig() {
    const element = document.getElementById("ioc-config");
    const config = readJson(element ? element.textContent : "", {});
    return {
      tiles: config.tiles || null,
      timeZone: config.time_zone || undefined,
      domains: Array.isArray(config.domains) ? config.domains : [],
    };
  }

  function t(key, values) {
    let text = (TEXT[state.lang] && TEXT[state.lang][key]) || TEXT.en[key] || key;
    for (const [name, value] of Object.entries(values || {})) {
      text = text.replaceAll(`{${name}}`, String(value));
    }
    return text;
  }

  function locale() {
    return state.lang === "vi" ? "vi-VN" : "en-GB";
  }

  function el(tag, attributes, ...children) {
    const element = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") element.className = value;
      else if (name === "text") element.textContent = value;
      else element.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child !== null && child !== undefined) element.append(child);
    }
    return element;
  }

  function formatTime(value) {
    if (!value) return t("never");
    const date = new Date(value);
    if (Number.isNaN(date.getTime())) return String(value);
    return new Intl.DateTimeFormat(locale(), {
      day: "2-digit",
      month: "2-digit",
      hour: "2-digit",
      minute: "2-digit",
      second: "2-digit",
      timeZone: CONFIG.timeZone,
    }).format(date);
  }

  function metricMeta(domain, name) {
    const meta = DOMAIN_META.get(domain);
    return meta ? meta.metrics.find((m) => m.name === name) || null : null;
  }

  function formatValue(value, unit, decimals) {
    if (value === null || value === undefined || typeof value !== "number" || !Number.isFinite(value)) {
      return "—";
    }
    if (unit === "fraction") {
      return new Intl.NumberFormat(locale(), {
        style: "percent",
        maximumFractionDigits: Math.max(0, decimals - 2),
      }).format(value);
    }
    const number = new Intl.NumberFormat(locale(), { maximumFractionDigits: decimals }).format(value);
    return unit ? `${number} ${unit}` : number;
  }

  function formatMetric(domain, name, value) {
    const meta = metricMeta(domain, name);
    if (!meta) return formatValue(value, "", 2);
    return formatValue(value, meta.unit[state.lang] ?? meta.unit.en, meta.decimals);
  }

  function metricLabel(domain, name) {
    const meta = metricMeta(domain, name);
    return meta ? meta.label[state.lang] || meta.label.en : name;
  }

  function domainTitle(domain) {
    const meta = DOMAIN_META.get(domain);
    return meta ? meta.title[state.lang] || meta.title.en : domain;
  }

  function sleep(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
  }

  // ------------------------------------------------------------------ API

  class ApiError extends Error {
    constructor(status, problem) {
      super((problem && (problem.detail || problem.title)) || `HTTP ${status}`);
      this.status = status;
      this.problem = problem;
    }
  }

  async function api(path, options) {
    const { method = "GET", body } = options || {};
    const headers = { "X-API-Key": state.key, Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        // Polled views carry an ETag: the browser revalidates and gets 304 while nothing changed.
        cache: method === "GET" ? "no-cache" : "no-store",
      });
    } catch (error) {
      throw new ApiError(0, { detail: String(error) });
    }
    if (!response.ok) throw await failure(response);
    return response.status === 204 ? null : response.json();
  }

  async function failure(response) {
    const problem = await response.json().catch(() => null);
    if (response.status === 401) unauthorized();
    return new ApiError(response.status, problem);
  }

  // A polled view asked with the ETag of the last answer: {changed: false} on 304. The browser's
  // cache stays out of it, so the 304 reaches the page.
  async function apiIfChanged(path, etag) {
    const headers = { "X-API-Key": state.key, Accept: "application/geo+json, application/json" };
    if (etag) headers["If-None-Match"] = etag;
    let response;
    try {
      response = await fetch(path, { headers, cache: "no-store" });
    } catch (error) {
      throw new ApiError(0, { detail: String(error) });
    }
    if (response.status === 304) return { changed: false, etag, body: null };
    if (!response.ok) throw await failure(response);
    return { changed: true, etag: response.headers.get("ETag"), body: await response.json() };
  }

  function cityQuery(city) {
    return `city=${encodeURIComponent(city)}`;
  }

  // ------------------------------------------------------------------ notices and language

  function showNotice(key, values) {
    const notice = $("#notice");
    state.noticeKey = key ? { key, values } : null;
    notice.hidden = !key;
    notice.textContent = key ? t(key, values) : "";
  }

  function clearNotice(key) {
    if (state.noticeKey && (!key || state.noticeKey.key === key)) showNotice(null);
  }

  function reportError(error) {
    if (error.status === 401) return; // the key form says it
    if (error.status === 0 || error.status >= 500) showNotice("err_unreachable");
    else showNotice("err_generic", { status: error.status, detail: error.message });
  }

  function applyLanguage() {
    document.documentElement.lang = state.lang;
    document.title = `${t("title")} — IOC`;
    for (const node of document.querySelectorAll("[data-i18n]")) node.textContent = t(node.dataset.i18n);
    for (const node of document.querySelectorAll("[data-i18n-label]")) {
      node.setAttribute("aria-label", t(node.dataset.i18nLabel));
    }
    const toggle = $("#language");
    const other = state.lang === "vi" ? "en" : "vi";
    toggle.lang = other;
    toggle.textContent = other === "en" ? "English" : "Tiếng Việt";
    toggle.dataset.lang = state.lang;
    if (state.noticeKey) showNotice(state.noticeKey.key, state.noticeKey.values);
    setConnection($("#connection").dataset.state);
    renderCities();
    renderToggles();
    renderAreaToggles();
    renderAreaFilter();
    renderLegend();
    renderSummary();
    renderAlarms(true);
    for (const device of state.devices.values()) {
      if (device.marker.isPopupOpen()) device.marker.getPopup().update();
    }
    updateAreaPopup();
    renderPanel();
    renderIncidents();
  }

  function setLanguage(lang) {
    state.lang = lang;
    localStorage.setItem(STORE.lang, lang);
    applyLanguage();
  }

  function setConnection(kind) {
    const node = $("#connection");
    node.dataset.state = kind;
    node.textContent = kind === "idle" ? "" : t(`conn_${kind}`);
  }

  // ------------------------------------------------------------------ key

  function takeKeyFromFragment() {
    const hash = window.location.hash.replace(/^#/, "");
    if (!hash) return false;
    const params = new URLSearchParams(hash);
    const key = params.get("key");
    if (key === null) return false;
    params.delete("key");
    const rest = params.toString();
    // Out of the address bar and the history at once.
    history.replaceState(null, "", window.location.pathname + window.location.search + (rest ? `#${rest}` : ""));
    if (!key.trim()) return false;
    state.key = key.trim();
    sessionStorage.setItem(STORE.key, state.key);
    return true;
  }

  function showKeyForm(errorKey) {
    stop();
    $("#board").hidden = true;
    $("#forget-key").hidden = true;
    $("#city-picker").hidden = true;
    const form = $("#key-form");
    form.hidden = false;
    const error = $("#key-error");
    error.hidden = !errorKey;
    error.textContent = errorKey ? t(errorKey) : "";
    const input = $("#key-input");
    input.value = "";
    input.focus();
  }

  function unauthorized() {
    state.key = null;
    sessionStorage.removeItem(STORE.key);
    showKeyForm("err_key");
  }

  // ------------------------------------------------------------------ start, stop, cities

  function stop() {
    state.generation += 1;
    if (state.streamAbort) state.streamAbort.abort();
    state.streamAbort = null;
    clearTimeout(state.pollTimer);
    state.pollTimer = null;
    clearTimeout(state.refreshTimer);
    state.pending.clear();
    state.live = false;
    setConnection("idle");
  }

  async function begin() {
    stop();
    const generation = state.generation;
    $("#key-form").hidden = true;
    $("#board").hidden = false;
    $("#forget-key").hidden = false;
    $("#city-picker").hidden = false;
    setupMap();
    setConnection("connecting");
    let cities;
    try {
      cities = (await api("/v1/cities")).items || [];
    } catch (error) {
      if (generation !== state.generation) return;
      reportError(error);
      if (error.status !== 401) state.pollTimer = setTimeout(begin, POLL_MS);
      return;
    }
    if (generation !== state.generation) return;
    state.cities = cities;
    renderCities();
    if (!cities.length) {
      // A new system: cities come with their first devices.
      showNotice("no_cities");
      setConnection("idle");
      state.pollTimer = setTimeout(begin, POLL_MS);
      return;
    }
    clearNotice("no_cities");
    const remembered = localStorage.getItem(STORE.city);
    const chosen = cities.some((c) => c.city === remembered) ? remembered : cities[0].city;
    selectCity(chosen);
  }

  function renderCities() {
    const select = $("#city");
    const current = state.city;
    select.replaceChildren(
      ...state.cities.map((c) =>
        el("option", { value: c.city, text: c.name && c.name !== c.city ? c.name : c.city }),
      ),
    );
    select.disabled = state.cities.length === 0;
    if (current) select.value = current;
  }

  function selectCity(city) {
    stop();
    state.city = city;
    localStorage.setItem(STORE.city, city);
    $("#city").value = city;
    state.lastEventId = null;
    state.retryBaseMs = 1000;
    state.retryMs = 1000;
    state.alarms.clear();
    state.alarmsMore = false;
    state.alarmArea = "";
    state.summary = null;
    closePanel();
    closeAreaPopup();
    for (const group of state.groups.values()) group.clearLayers();
    state.devices.clear();
    for (const group of state.areaGroups.values()) group.clearLayers();
    state.areas.clear();
    state.areasLoaded = false;
    state.areasEtag = null;
    renderAlarms(true);
    renderSummary();
    renderToggles();
    renderAreaToggles();
    renderAreaFilter();
    state.fitted = false;
    state.userMoved = false;
    fitCity();
    setConnection("connecting");
    const generation = state.generation;
    resetIncidents(generation);
    refreshAll(generation).finally(() => schedulePoll(generation));
    runStream(generation);
  }

  // ------------------------------------------------------------------ refreshing

  async function refreshAll(generation) {
    await Promise.all([
      refreshCities(generation),
      refreshSummary(generation),
      refreshAlarms(generation),
      refreshAreas(generation),
      refreshPanel(generation),
      refreshIncidents(generation),
      ...DOMAIN_NAMES.map((d) => refreshLayer(generation, d)),
    ]);
  }

  // A poll already due sooner is kept: a stream that keeps failing must not put polling off.
  function schedulePoll(generation) {
    if (generation !== state.generation) return;
    const interval = state.live ? POLL_LIVE_MS : POLL_MS;
    const due = Date.now() + interval;
    if (state.pollTimer && state.pollDue <= due) return;
    clearTimeout(state.pollTimer);
    state.pollDue = due;
    state.pollTimer = setTimeout(() => {
      state.pollTimer = null;
      if (generation !== state.generation) return;
      refreshAll(generation).finally(() => schedulePoll(generation));
    }, interval);
  }

  // Several events in a burst make one refresh of each thing they touched.
  function requestRefresh(...things) {
    for (const thing of things) state.pending.add(thing);
    if (state.refreshTimer) return;
    const generation = state.generation;
    state.refreshTimer = setTimeout(() => {
      state.refreshTimer = null;
      if (generation !== state.generation) return;
      const things_ = [...state.pending];
      state.pending.clear();
      for (const thing of things_) {
        if (thing === "summary") refreshSummary(generation);
        else if (thing === "alarms") refreshAlarms(generation);
        else if (thing === "areas") refreshAreas(generation);
        else if (thing === "panel-alarms") refreshPanelAlarms(generation);
        else if (thing.startsWith("layer:")) refreshLayer(generation, thing.slice(6));
      }
    }, 250);
  }

  async function guarded(generation, task) {
    try {
      await task();
      if (generation === state.generation) clearNotice("err_unreachable");
    } catch (error) {
      if (generation === state.generation) reportError(error);
    }
  }

  // New cities, and a city's box growing with new devices.
  function refreshCities(generation) {
    return guarded(generation, async () => {
      const cities = (await api("/v1/cities")).items || [];
      if (generation !== state.generation) return;
      const before = JSON.stringify(cityInfo());
      if (JSON.stringify(cities) === JSON.stringify(state.cities)) return;
      state.cities = cities;
      renderCities();
      if (!state.userMoved && JSON.stringify(cityInfo()) !== before) fitView();
    });
  }

  function refreshSummary(generation) {
    return guarded(generation, async () => {
      const summary = await api(`/v1/summary?${cityQuery(state.city)}`);
      if (generation !== state.generation) return;
      state.summary = summary;
      renderSummary();
    });
  }

  function refreshAlarms(generation) {
    return guarded(generation, async () => {
      const area = state.alarmArea;
      const filter = area ? `&area=${encodeURIComponent(area)}` : "";
      const page = await api(
        `/v1/alarms?state=active,acknowledged&${cityQuery(state.city)}${filter}&limit=${ALARM_PAGE}`,
      );
      // A city or filter changed while this was asked: its answer is someone else's.
      if (generation !== state.generation || area !== state.alarmArea) return;
      state.alarms = new Map((page.items || []).map((a) => [a.id, a]));
      state.alarmsMore = Boolean(page.next);
      renderAlarms(false);
    });
  }

  function refreshLayer(generation, domain) {
    return guarded(generation, async () => {
      let collection;
      try {
        collection = await api(`/v1/layers/${encodeURIComponent(domain)}?${cityQuery(state.city)}`);
      } catch (error) {
        // A key limited to other domains sees nothing of this one.
        if (error.status === 403 || error.status === 404) collection = { features: [] };
        else throw error;
      }
      if (generation !== state.generation) return;
      const seen = new Set();
      for (const feature of collection.features || []) {
        const props = feature.properties || {};
        const id = props.id ?? feature.id;
        const coordinates = feature.geometry && feature.geometry.coordinates;
        if (id === undefined || !Array.isArray(coordinates)) continue;
        seen.add(String(id));
        upsertDevice(String(id), { ...props, domain: props.domain || domain }, coordinates);
      }
      for (const [id, device] of state.devices) {
        if (device.props.domain === domain && !seen.has(id)) {
          state.groups.get(domain)?.removeLayer(device.marker);
          state.devices.delete(id);
        }
      }
      renderToggles();
      renderAlarms(false); // "show on map" for district alarms needs the district's devices
      if (!state.fitted && !viewBounds() && state.devices.size) fitDevices();
    });
  }

  // ------------------------------------------------------------------ map

  function setupMap() {
    if (state.map) {
      state.map.invalidateSize();
      return;
    }
    const map = L.map("map", {
      zoomControl: true,
      attributionControl: true,
      preferCanvas: false, // SVG paths, each one an element with the device's attributes
      maxZoom: 19,
      minZoom: 3,
      zoomSnap: 0.25,
      worldCopyJump: false,
    });
    map.attributionControl.setPrefix("Leaflet");
    if (CONFIG.tiles && CONFIG.tiles.url) {
      L.tileLayer(CONFIG.tiles.url, { attribution: CONFIG.tiles.attribution || "", maxZoom: 19 }).addTo(map);
      document.getElementById("map").classList.add("with-tiles");
    }
    // Areas lie under the devices (the overlay pane): filled ones lowest, outlines over them.
    map.createPane("areaFill");
    map.createPane("areaLine");
    for (const kind of AREA_KINDS) {
      const group = L.geoJSON(null, {
        pane: FILLED_KINDS.has(kind) ? "areaFill" : "areaLine",
        style: () => areaStyle(kind),
        onEachFeature: (feature, layer) => bindArea(feature, layer),
      });
      state.areaGroups.set(kind, group);
      if (!state.hiddenKinds.has(kind)) group.addTo(map);
    }
    for (const domain of DOMAIN_NAMES) {
      const group = L.layerGroup();
      state.groups.set(domain, group);
      if (!state.hidden.has(domain)) group.addTo(map);
    }
    map.setView([16.0, 106.0], 6);
    state.map = map;
    // Until someone moves the map by hand, it keeps the city in view whatever the layout does
    // (summary tiles arriving, a window resized).
    const container = map.getContainer();
    for (const type of ["pointerdown", "wheel", "keydown"]) {
      container.addEventListener(type, () => (state.userMoved = true), { passive: true });
    }
    new ResizeObserver(() => {
      map.invalidateSize({ pan: false });
      if (!state.userMoved) fitView();
    }).observe(container);
  }

  function fitView() {
    if (viewBounds()) fitCity();
    else if (state.devices.size) fitDevices();
  }

  function cityInfo() {
    return state.cities.find((c) => c.city === state.city) || null;
  }

  function cityBounds() {
    const info = cityInfo();
    const bbox = info && info.bbox;
    if (!Array.isArray(bbox) || bbox.length !== 4 || !bbox.every(Number.isFinite)) return null;
    return L.latLngBounds([bbox[1], bbox[0]], [bbox[3], bbox[2]]);
  }

  // The city's devices and its areas: without map tiles the areas are what gives the map its shape.
  function viewBounds() {
    let bounds = null;
    for (const part of [cityBounds(), areaBounds()]) {
      if (!part || !part.isValid()) continue;
      if (bounds) bounds.extend(part);
      else bounds = L.latLngBounds(part.getSouthWest(), part.getNorthEast());
    }
    return bounds;
  }

  function fitCity() {
    if (!state.map) return;
    const bounds = viewBounds();
    const info = cityInfo();
    // Not animated: Leaflet drops a view change asked for while a zoom animation runs, and the
    // areas, the devices and the layout each ask for one as they arrive.
    const now = { animate: false };
    if (bounds && bounds.isValid()) {
      if (bounds.getNorthEast().equals(bounds.getSouthWest())) state.map.setView(bounds.getCenter(), 15, now);
      else state.map.fitBounds(bounds, { padding: [24, 24], maxZoom: 16, ...now });
      state.fitted = true;
    } else if (info && info.center && Number.isFinite(info.center.lat) && Number.isFinite(info.center.lon)) {
      state.map.setView([info.center.lat, info.center.lon], 12, now);
    }
  }

  function fitDevices() {
    const points = [...state.devices.values()].map((d) => d.marker.getLatLng());
    if (!points.length) return;
    state.map.fitBounds(L.latLngBounds(points), { padding: [24, 24], maxZoom: 15, animate: false });
    state.fitted = true;
  }

  function worstSeverity(...severities) {
    let worst = null;
    for (const s of severities) if (RANK[s] && (!worst || RANK[s] > RANK[worst])) worst = s;
    return worst;
  }

  function markerLook(props) {
    const severity = worstSeverity(props.alarm_severity);
    const status = STATUSES.includes(props.status) ? props.status : "unknown";
    return { severity, status, css: severity ? `sev-${severity}` : `status-${status}` };
  }

  function decorate(device) {
    const path = device.marker.getElement();
    if (!path) return;
    const props = device.props;
    const look = markerLook(props);
    path.setAttribute("class", `leaflet-interactive device-marker ${look.css}`);
    path.setAttribute("data-testid", "device-marker");
    path.setAttribute("data-device-id", props.id);
    path.setAttribute("data-domain", props.domain);
    path.setAttribute("data-status", look.status);
    path.setAttribute("data-severity", look.severity || "none");
  }

  function upsertDevice(id, props, coordinates) {
    const latlng = L.latLng(coordinates[1], coordinates[0]);
    let device = state.devices.get(id);
    if (!device) {
      const marker = L.circleMarker(latlng, {
        radius: 7,
        weight: 2,
        fillOpacity: 0.9,
        className: "device-marker",
      });
      device = { props: { ...props, id }, marker };
      // The panel first: the map narrows, and the popup then opens (and pans) within what is left.
      marker.on("click", () => openPanel(id));
      marker.bindPopup(() => popupContent(id), { maxWidth: 360 });
      // Leaflet makes a new element each time the marker is added to the map (a layer toggled back on).
      marker.on("add", () => decorate(state.devices.get(id) || device));
      state.devices.set(id, device);
      state.groups.get(props.domain)?.addLayer(marker);
    } else {
      const previousDomain = device.props.domain;
      const current = device.props;
      // A layer asked for before a state event arrived must not take the device back in time.
      const stale = current.ts && (!props.ts || new Date(props.ts) < new Date(current.ts));
      device.props = { ...current, ...props, id };
      if (stale) Object.assign(device.props, { ts: current.ts, metrics: current.metrics, status: current.status });
      if (previousDomain !== device.props.domain) {
        state.groups.get(previousDomain)?.removeLayer(device.marker);
        state.groups.get(device.props.domain)?.addLayer(device.marker);
      }
      if (!device.marker.getLatLng().equals(latlng)) device.marker.setLatLng(latlng);
    }
    refreshDevice(device);
  }

  function refreshDevice(device) {
    decorate(device);
    if (device.marker.isPopupOpen()) device.marker.getPopup().update();
    if (state.panel && state.panel.id === device.props.id) renderPanelFacts();
  }

  // A state or status event: the marker changes at once; a device the page does not know yet
  // (just registered) comes with its domain's layer.
  function updateDevice(id, change, domain) {
    const device = state.devices.get(id);
    if (!device) {
      if (domain) requestRefresh(`layer:${domain}`);
      return;
    }
    const props = device.props;
    if (change.ts && props.ts && new Date(change.ts) < new Date(props.ts)) return;
    if (change.status) props.status = change.status;
    if (change.ts) props.ts = change.ts;
    if (change.metrics) props.metrics = { ...(props.metrics || {}), ...change.metrics };
    refreshDevice(device);
  }

  function popupContent(id) {
    const device = state.devices.get(id);
    if (!device) return el("div");
    const p = device.props;
    const look = markerLook(p);
    const rows = el("dl", { class: "popup-facts" });
    const add = (label, value, attributes) => {
      rows.append(el("dt", { text: label }), el("dd", { text: value, ...(attributes || {}) }));
    };
    add(t("status"), t(`status_${look.status}`), { "data-testid": "popup-status" });
    if (p.district) add(t("district"), p.district);
    add(t("last_reading"), formatTime(p.ts));
    const metrics = p.metrics || {};
    const meta = DOMAIN_META.get(p.domain);
    const names = [
      ...(meta ? meta.metrics.map((m) => m.name).filter((n) => n in metrics) : []),
      ...Object.keys(metrics).filter((n) => !metricMeta(p.domain, n)),
    ];
    for (const name of names) {
      add(metricLabel(p.domain, name), formatMetric(p.domain, name, metrics[name]), {
        "data-metric": name,
      });
    }
    if (p.open_alarms) {
      add(t("open_alarms"), `${p.open_alarms}${look.severity ? ` · ${t(`sev_${look.severity}`)}` : ""}`);
    }
    const area = worstSeverity(p.area_alarm_severity);
    if (area) add(t("area_alarm"), t(`sev_${area}`));
    return el(
      "div",
      { class: "popup", "data-testid": "popup", "data-device-id": id },
      el("h3", { text: p.name || id }),
      el("p", { class: "popup-sub", text: [domainTitle(p.domain), p.name ? id : null].filter(Boolean).join(" · ") }),
      rows,
    );
  }

  function locateDevice(id) {
    const device = state.devices.get(id);
    if (!device || !state.map) return;
    const domain = device.props.domain;
    if (state.hidden.has(domain)) toggleDomain(domain);
    state.userMoved = true;
    openPanel(id);
    state.map.setView(device.marker.getLatLng(), Math.max(state.map.getZoom(), 15), { animate: false });
    device.marker.openPopup();
  }

  // An area-wide alarm: its domain's devices in its areas; one of older releases (no areas): its
  // domain's devices in its district.
  function districtDevices(alarm) {
    const areas = alarm.areas || [];
    if (areas.length) {
      return [...state.devices.values()].filter(
        (d) => d.props.domain === alarm.domain && (d.props.areas || []).some((a) => areas.includes(a)),
      );
    }
    if (!alarm.district) return [];
    return [...state.devices.values()].filter(
      (d) => d.props.domain === alarm.domain && d.props.district === alarm.district,
    );
  }

  function locateAlarm(alarm) {
    if (alarm.device_id) {
      locateDevice(alarm.device_id);
      return;
    }
    const devices = districtDevices(alarm);
    if (!devices.length || !state.map) return;
    if (state.hidden.has(alarm.domain)) toggleDomain(alarm.domain);
    state.userMoved = true;
    const bounds = L.latLngBounds(devices.map((d) => d.marker.getLatLng()));
    state.map.fitBounds(bounds, { padding: [48, 48], maxZoom: 15, animate: false });
  }

  function toggleDomain(domain) {
    const group = state.groups.get(domain);
    if (!group || !state.map) return;
    if (state.hidden.has(domain)) {
      state.hidden.delete(domain);
      group.addTo(state.map);
    } else {
      state.hidden.add(domain);
      group.remove();
    }
    localStorage.setItem(STORE.hidden, JSON.stringify([...state.hidden]));
    renderToggles();
  }

  function renderToggles() {
    const box = $("#layer-toggles");
    if (box.children.length !== DOMAIN_NAMES.length) {
      box.replaceChildren(
        ...DOMAIN_NAMES.map((domain) =>
          el("button", {
            type: "button",
            class: "toggle",
            "data-testid": "layer-toggle",
            "data-domain": domain,
          }),
        ),
      );
    }
    const counts = new Map(DOMAIN_NAMES.map((d) => [d, 0]));
    for (const device of state.devices.values()) {
      counts.set(device.props.domain, (counts.get(device.props.domain) || 0) + 1);
    }
    for (const button of box.children) {
      const domain = button.dataset.domain;
      button.setAttribute("aria-pressed", String(!state.hidden.has(domain)));
      button.title = t("show_layer", { domain: domainTitle(domain) });
      button.replaceChildren(
        el("span", { class: "toggle-label", text: domainTitle(domain) }),
        el("span", { class: "toggle-count", text: String(counts.get(domain) || 0) }),
      );
    }
  }

  function renderLegend() {
    const legend = $("#legend");
    legend.replaceChildren(
      ...SEVERITIES.map((s) =>
        el("li", null, el("span", { class: `swatch sev-${s}`, "aria-hidden": "true" }), t(`sev_${s}`)),
      ),
      ...STATUSES.map((s) =>
        el("li", null, el("span", { class: `swatch status-${s}`, "aria-hidden": "true" }), t(`status_${s}`)),
      ),
    );
  }

  // ------------------------------------------------------------------ areas

  function areaStyle(kind) {
    // The look is the stylesheet's (.area and its kinds); these are what Leaflet needs to know.
    const filled = FILLED_KINDS.has(kind);
    return {
      className: "area",
      weight: kind === "province" ? 3 : 2,
      fill: filled,
      fillOpacity: filled ? 0.2 : 0,
      dashArray: filled || kind === "province" ? null : "8 6",
    };
  }

  function bindArea(feature, layer) {
    const id = String(feature.id);
    const area = state.areas.get(id);
    if (!area) return;
    area.layer = layer;
    // Leaflet makes a new element each time the area is added to the map (a kind toggled back on).
    layer.on("add", () => decorateArea(state.areas.get(id)));
    layer.on("click", (event) => openAreaPopup(id, event.latlng));
  }

  function areaLook(area) {
    const severity = worstSeverity(area.state && area.state.alarm_severity);
    return { severity, css: severity ? `sev-${severity}` : "area-neutral" };
  }

  function decorateArea(area) {
    const path = area && area.layer && area.layer.getElement();
    if (!path) return;
    const look = areaLook(area);
    const shape = FILLED_KINDS.has(area.kind) ? "area-filled" : "area-outline";
    path.setAttribute("class", `leaflet-interactive area ${shape} kind-${area.kind} ${look.css}`);
    path.setAttribute("data-testid", "area");
    path.setAttribute("data-area-id", area.id);
    path.setAttribute("data-kind", area.kind);
    path.setAttribute("data-severity", look.severity || "none");
  }

  function areaName(area) {
    const props = area.props;
    return (state.lang === "en" && props.name_en) || props.name_vi || props.name_en || area.id;
  }

  function kindLabel(kind) {
    return TEXT.en[`kind_${kind}`] ? t(`kind_${kind}`) : kind;
  }

  function areaKind(props) {
    return AREA_KINDS.includes(props.kind) ? props.kind : "custom";
  }

  function areaBounds() {
    let bounds = null;
    for (const area of state.areas.values()) {
      const box = area.bbox;
      if (!Array.isArray(box) || box.length !== 4 || !box.every(Number.isFinite)) continue;
      const part = L.latLngBounds([box[1], box[0]], [box[3], box[2]]);
      if (bounds) bounds.extend(part);
      else bounds = part;
    }
    return bounds;
  }

  // The geometries once per city (and again when the areas themselves change); their state is
  // polled without them, with the ETag of the last answer: a 304 while nothing changed.
  async function loadAreas(generation) {
    let collection;
    try {
      collection = await api(`/v1/areas?${cityQuery(state.city)}`);
    } catch (error) {
      // An API without areas.
      if (error.status === 404) collection = { features: [] };
      else throw error;
    }
    if (generation !== state.generation) return false;
    const previous = state.areas;
    state.areas = new Map();
    const byKind = new Map(AREA_KINDS.map((k) => [k, []]));
    for (const feature of collection.features || []) {
      const geometry = feature && feature.geometry;
      if (feature.id === undefined || !geometry || !/^(Multi)?Polygon$/.test(geometry.type)) continue;
      const id = String(feature.id);
      const props = feature.properties || {};
      const kind = areaKind(props);
      const old = previous.get(id);
      state.areas.set(id, { id, kind, props, geometry, bbox: feature.bbox, state: old ? old.state : null });
      byKind.get(kind).push(feature);
    }
    for (const [kind, group] of state.areaGroups) {
      group.clearLayers();
      const features = byKind.get(kind).sort((a, b) => String(a.id).localeCompare(String(b.id)));
      if (features.length) group.addData({ type: "FeatureCollection", features });
    }
    state.areasLoaded = true;
    if (state.areaPopup && state.areaPopup.popup.isOpen() && !state.areas.has(state.areaPopup.id)) {
      closeAreaPopup();
    }
    if (state.alarmArea && !state.areas.has(state.alarmArea)) setAlarmArea("");
    renderAreaToggles();
    renderAreaFilter();
    if (!state.userMoved) fitView();
    return true;
  }

  function refreshAreas(generation) {
    return guarded(generation, async () => {
      if (!state.areasLoaded && !(await loadAreas(generation))) return;
      let answer;
      try {
        answer = await apiIfChanged(
          `/v1/areas?${cityQuery(state.city)}&with=state&geometry=false`,
          state.areasEtag,
        );
      } catch (error) {
        if (error.status === 404) return;
        throw error;
      }
      if (generation !== state.generation || !answer.changed) return;
      const features = (answer.body && answer.body.features) || [];
      // Areas stored, replaced or removed since the geometries were read: read them again.
      const redraw =
        features.length !== state.areas.size ||
        features.some((f) => {
          const area = state.areas.get(String(f.id));
          return !area || area.props.updated_at !== (f.properties || {}).updated_at;
        });
      if (redraw && !(await loadAreas(generation))) return;
      state.areasEtag = answer.etag;
      for (const feature of features) {
        const area = state.areas.get(String(feature.id));
        if (!area) continue;
        area.state = (feature.properties && feature.properties.state) || null;
        decorateArea(area);
      }
      updateAreaPopup();
    });
  }

  // Whether a GeoJSON polygon holds a point (even-odd over its rings, holes included).
  function ringHolds(ring, x, y) {
    let inside = false;
    for (let i = 0, j = ring.length - 1; i < ring.length; j = i, i += 1) {
      const [xi, yi] = ring[i];
      const [xj, yj] = ring[j];
      if (yi > y !== yj > y && x < ((xj - xi) * (y - yi)) / (yj - yi) + xi) inside = !inside;
    }
    return inside;
  }

  function areaHolds(area, latlng) {
    const geometry = area.geometry;
    const polygons = geometry.type === "Polygon" ? [geometry.coordinates] : geometry.coordinates;
    return polygons.some(
      (rings) =>
        rings.length > 0 &&
        ringHolds(rings[0], latlng.lng, latlng.lat) &&
        !rings.slice(1).some((hole) => ringHolds(hole, latlng.lng, latlng.lat)),
    );
  }

  // A click on an area: its summary, and the other areas at that point (a ward's catchment, its
  // province) a click away, since only the topmost one takes the click.
  function openAreaPopup(id, latlng) {
    if (!state.map) return;
    const here = [...state.areas.values()]
      .filter((a) => a.id !== id && !state.hiddenKinds.has(a.kind) && areaHolds(a, latlng))
      .sort((a, b) => AREA_KINDS.indexOf(a.kind) - AREA_KINDS.indexOf(b.kind))
      .map((a) => a.id);
    if (!state.areaPopup) state.areaPopup = { popup: L.popup({ maxWidth: 380, className: "area-popup" }) };
    Object.assign(state.areaPopup, { id, here: [id, ...here] });
    state.areaPopup.popup
      .setLatLng(latlng)
      .setContent(() => areaSummary())
      .openOn(state.map);
  }

  function showArea(id) {
    if (!state.areaPopup || !state.areaPopup.popup.isOpen()) return;
    state.areaPopup.id = id;
    state.areaPopup.popup.update();
  }

  function updateAreaPopup() {
    if (state.areaPopup && state.areaPopup.popup.isOpen()) state.areaPopup.popup.update();
  }

  function closeAreaPopup() {
    if (state.areaPopup) state.areaPopup.popup.close();
  }

  function areaSummary() {
    const id = state.areaPopup && state.areaPopup.id;
    const area = state.areas.get(id);
    if (!area) return el("div");
    const props = area.props;
    const other = state.lang === "en" ? props.name_vi : props.name_en;
    const sub = [other && other !== areaName(area) ? other : null, kindLabel(area.kind), props.code];
    if (props.approximate) sub.push(t("approximate"));
    const summary = el(
      "div",
      { class: "popup area-summary", "data-testid": "area-summary", "data-area-id": id, "data-kind": area.kind },
      el("h3", { text: areaName(area) }),
      el("p", { class: "popup-sub", text: sub.filter(Boolean).join(" · ") }),
    );
    const facts = el("dl", { class: "popup-facts" });
    const add = (label, value, name) =>
      facts.append(el("dt", { text: label }), el("dd", { text: value, "data-fact": name }));
    const s = area.state;
    const devices = (s && s.devices) || {};
    add(t("devices_total"), s ? String(devices.total ?? 0) : "…", "total");
    add(t("status_online"), s ? String(devices.online ?? 0) : "…", "online");
    add(t("status_offline"), s ? String(devices.offline ?? 0) : "…", "offline");
    if (devices.unknown) add(t("status_unknown"), String(devices.unknown), "unknown");
    const severity = s && worstSeverity(s.alarm_severity);
    add(
      t("open_alarms"),
      s ? `${s.open_alarms ?? 0}${severity ? ` · ${t(`sev_${severity}`)}` : ""}` : "…",
      "alarms",
    );
    summary.append(facts);
    if (s && !devices.total) summary.append(el("p", { class: "empty", text: t("no_devices_here") }));
    const domains = (s && s.domains) || {};
    for (const domain of [...DOMAIN_NAMES, ...Object.keys(domains).filter((d) => !DOMAIN_META.has(d))]) {
      const data = domains[domain];
      if (!data) continue;
      const figures = el("dl", { class: "popup-facts", "data-domain": domain });
      for (const figure of data.figures || []) {
        const label = (state.lang === "vi" ? figure.label_vi : figure.label_en) || figure.label_en || figure.name;
        const meta = metricMeta(domain, figure.name);
        figures.append(
          el("dt", { text: label }),
          el("dd", {
            "data-figure": figure.name,
            text: formatValue(figure.value, figure.unit ?? "", meta ? meta.decimals : 1),
          }),
        );
      }
      summary.append(el("h4", { class: "popup-domain", text: domainTitle(domain) }), figures);
    }
    const filter = el("button", {
      type: "button",
      class: "button subtle",
      "data-testid": "area-filter-alarms",
      text: t("filter_here"),
    });
    filter.addEventListener("click", () => setAlarmArea(id));
    summary.append(el("div", { class: "popup-actions" }, filter));
    const others = (state.areaPopup.here || []).filter((other) => other !== id && state.areas.has(other));
    if (others.length) {
      const list = el("ul", { class: "also-here" });
      for (const otherId of others) {
        const otherArea = state.areas.get(otherId);
        const button = el("button", {
          type: "button",
          class: "link",
          "data-area-id": otherId,
          text: `${areaName(otherArea)} (${kindLabel(otherArea.kind)})`,
        });
        button.addEventListener("click", () => showArea(otherId));
        list.append(el("li", null, button));
      }
      summary.append(el("p", { class: "popup-label", text: t("also_here") }), list);
    }
    return summary;
  }

  function toggleAreaKind(kind) {
    const group = state.areaGroups.get(kind);
    if (!group || !state.map) return;
    if (state.hiddenKinds.has(kind)) {
      state.hiddenKinds.delete(kind);
      group.addTo(state.map);
    } else {
      state.hiddenKinds.add(kind);
      group.remove();
      if (state.areaPopup && state.areas.get(state.areaPopup.id)?.kind === kind) closeAreaPopup();
    }
    localStorage.setItem(STORE.hiddenKinds, JSON.stringify([...state.hiddenKinds]));
    renderAreaToggles();
  }

  // A toggle per kind the city has, each with a swatch of how that kind is drawn.
  function renderAreaToggles() {
    const box = $("#area-toggles");
    const counts = new Map();
    for (const area of state.areas.values()) counts.set(area.kind, (counts.get(area.kind) || 0) + 1);
    const kinds = AREA_KINDS.filter((k) => counts.has(k));
    box.hidden = kinds.length === 0;
    box.replaceChildren(
      ...kinds.map((kind) =>
        el(
          "button",
          {
            type: "button",
            class: "toggle",
            "data-testid": "area-toggle",
            "data-kind": kind,
            "aria-pressed": String(!state.hiddenKinds.has(kind)),
            title: t("show_area_layer", { kind: kindLabel(kind) }),
          },
          el("span", { class: `area-swatch kind-${kind}`, "aria-hidden": "true" }),
          el("span", { class: "toggle-label", text: kindLabel(kind) }),
          el("span", { class: "toggle-count", text: String(counts.get(kind)) }),
        ),
      ),
    );
  }

  // The alarm list's area filter: every area of the city, by kind.
  function renderAreaFilter() {
    const select = $("#alarm-area");
    const groups = [];
    for (const kind of AREA_KINDS) {
      const areas = [...state.areas.values()]
        .filter((a) => a.kind === kind)
        .sort((a, b) => areaName(a).localeCompare(areaName(b), locale()));
      if (!areas.length) continue;
      groups.push(
        el(
          "optgroup",
          { label: kindLabel(kind) },
          ...areas.map((a) => el("option", { value: a.id, text: areaName(a) })),
        ),
      );
    }
    select.replaceChildren(el("option", { value: "", text: t("all_areas") }), ...groups);
    select.value = state.alarmArea;
    select.disabled = state.areas.size === 0 && !state.alarmArea;
  }

  function setAlarmArea(id) {
    const select = $("#alarm-area");
    if (select.value !== id) select.value = id;
    if (id === state.alarmArea) return;
    state.alarmArea = id;
    state.alarms.clear();
    state.alarmsMore = false;
    renderAlarms(true);
    refreshAlarms(state.generation);
  }

  // ------------------------------------------------------------------ summary tiles

  function renderSummary() {
    const box = $("#tiles");
    const domains = (state.summary && state.summary.domains) || {};
    const names = [
      ...DOMAIN_NAMES.filter((d) => d in domains),
      ...Object.keys(domains).filter((d) => !DOMAIN_META.has(d)),
    ];
    box.replaceChildren(...names.map((name) => summaryTile(name, domains[name] || {})));
  }

  function summaryTile(domain, data) {
    const devices = data.devices || {};
    const alarms = data.alarms || {};
    const worst = SEVERITIES.find((s) => (alarms[s] || 0) > 0) || null;
    const deviceLine = el(
      "p",
      { class: "tile-devices" },
      el("span", {
        class: "tile-online",
        text: t("devices_online", { online: devices.online ?? 0, total: devices.total ?? 0 }),
      }),
    );
    for (const status of ["offline", "unknown"]) {
      if (devices[status]) {
        deviceLine.append(el("span", { class: `tile-${status}`, text: t(`${status}_n`, { n: devices[status] }) }));
      }
    }
    const chips = SEVERITIES.filter((s) => (alarms[s] || 0) > 0).map((s) =>
      el("li", { class: `chip sev-${s}`, "data-severity": s, text: `${alarms[s]} ${t(`sev_${s}`)}` }),
    );
    const acknowledged = Object.values(data.acknowledged || {}).reduce((n, v) => n + (Number(v) || 0), 0);
    if (acknowledged) {
      chips.push(el("li", { class: "chip acknowledged", text: t("acknowledged_n", { n: acknowledged }) }));
    }
    const alarmLine = chips.length
      ? el("ul", { class: "tile-alarms" }, ...chips)
      : el("p", { class: "tile-alarms none", text: t("alarms_none") });
    const figures = el("dl", { class: "tile-figures" });
    for (const figure of data.figures || []) {
      const label = (state.lang === "vi" ? figure.label_vi : figure.label_en) || figure.label_en || figure.name;
      const meta = metricMeta(domain, figure.name);
      const unit = figure.unit ?? "";
      figures.append(
        el("dt", { text: label }),
        el("dd", { "data-figure": figure.name, text: formatValue(figure.value, unit, meta ? meta.decimals : 1) }),
      );
    }
    return el(
      "article",
      {
        class: `tile${worst ? ` worst-${worst}` : ""}`,
        "data-testid": "summary-tile",
        "data-domain": domain,
      },
      el("h3", { text: domainTitle(domain) }),
      deviceLine,
      alarmLine,
      figures,
    );
  }

  // ------------------------------------------------------------------ alarms

  const alarmRows = new Map(); // alarm id -> <li>

  function alarmOrder(a, b) {
    if (a.state !== b.state) return a.state === "active" ? -1 : 1;
    const bySeverity = (RANK[b.severity] || 0) - (RANK[a.severity] || 0);
    if (bySeverity) return bySeverity;
    return String(b.last_seen_at).localeCompare(String(a.last_seen_at));
  }

  function renderAlarms(force) {
    const list = $("#alarm-list");
    const alarms = [...state.alarms.values()].sort(alarmOrder);
    const keep = new Set(alarms.map((a) => String(a.id)));
    for (const [id, row] of alarmRows) {
      if (!keep.has(id)) {
        row.remove();
        alarmRows.delete(id);
      }
    }
    let previous = null;
    for (const alarm of alarms) {
      const id = String(alarm.id);
      let row = alarmRows.get(id);
      if (!row) {
        row = alarmRow(id);
        alarmRows.set(id, row);
      }
      fillAlarmRow(row, alarm, force);
      const expected = previous ? previous.nextSibling : list.firstChild;
      if (expected !== row) list.insertBefore(row, expected);
      previous = row;
    }
    $("#alarm-count").textContent = alarms.length ? `(${alarms.length})` : "";
    $("#alarms-empty").hidden = alarms.length > 0;
    $("#alarms-more").hidden = !state.alarmsMore;
  }

  function alarmRow(id) {
    const locate = el("button", { type: "button", class: "button subtle", "data-action": "locate" });
    const ack = el("button", {
      type: "button",
      class: "button primary",
      "data-action": "ack",
      "data-testid": "ack-button",
      "data-alarm-id": id,
    });
    return el(
      "li",
      { class: "alarm", "data-testid": "alarm", "data-alarm-id": id },
      el(
        "div",
        { class: "alarm-head" },
        el("span", { class: "badge" }),
        el("span", { class: "alarm-domain" }),
        el("span", { class: "alarm-state" }),
      ),
      el("p", { class: "alarm-message" }),
      el("p", { class: "alarm-meta" }),
      el("div", { class: "alarm-actions" }, locate, ack),
    );
  }

  function fillAlarmRow(row, alarm, force) {
    const signature = JSON.stringify([
      state.lang,
      alarm.state,
      alarm.severity,
      alarm.count,
      alarm.last_seen_at,
      alarm.acknowledged_at,
      alarm.message,
    ]);
    const locate = row.querySelector('[data-action="locate"]');
    locate.hidden = !alarm.device_id && !districtDevices(alarm).length;
    if (!force && row.dataset.signature === signature) return;
    row.dataset.signature = signature;
    row.dataset.state = alarm.state;
    row.dataset.severity = alarm.severity;
    row.className = `alarm sev-${alarm.severity} state-${alarm.state}`;
    if (alarm.device_id) row.dataset.deviceId = alarm.device_id;
    else delete row.dataset.deviceId;
    const badge = row.querySelector(".badge");
    badge.className = `badge sev-${alarm.severity}`;
    badge.textContent = t(`sev_${alarm.severity}`);
    row.querySelector(".alarm-domain").textContent = [domainTitle(alarm.domain), alarm.district]
      .filter(Boolean)
      .join(" · ");
    row.querySelector(".alarm-state").textContent = t(`state_${alarm.state}`);
    const messages = alarm.messages || {};
    row.querySelector(".alarm-message").textContent = messages[state.lang] || alarm.message || alarm.rule;
    const meta = [t("started", { time: formatTime(alarm.started_at) })];
    if (alarm.count > 1) meta.push(t("repeats", { n: alarm.count }));
    if (alarm.acknowledged_at) meta.push(t("acked_at", { time: formatTime(alarm.acknowledged_at) }));
    if (alarm.device_id) meta.push(alarm.device_id);
    row.querySelector(".alarm-meta").textContent = meta.join(" · ");
    locate.textContent = t("locate");
    const ack = row.querySelector('[data-action="ack"]');
    ack.hidden = alarm.state !== "active";
    if (!ack.disabled) ack.textContent = t("ack");
    ack.setAttribute("aria-label", `${t("ack")}: ${messages[state.lang] || alarm.message || alarm.rule}`);
  }

  async function acknowledge(button) {
    const id = button.dataset.alarmId;
    const generation = state.generation;
    button.disabled = true;
    button.textContent = t("acking");
    try {
      const alarm = await api(`/v1/alarms/${encodeURIComponent(id)}/ack`, { method: "POST", body: {} });
      if (generation !== state.generation) return;
      state.alarms.set(alarm.id, alarm);
      clearNotice();
    } catch (error) {
      if (generation !== state.generation || error.status === 401) return;
      if (error.status === 403) showNotice("err_forbidden_ack");
      else if (error.status === 409) showNotice("err_resolved");
      else reportError(error);
    } finally {
      button.disabled = false;
      button.textContent = t("ack");
    }
    renderAlarms(true);
    const alarm = state.alarms.get(Number(id)) || state.alarms.get(id);
    requestRefresh("alarms", "summary", ...(alarm ? [`layer:${alarm.domain}`] : []));
  }

  // ------------------------------------------------------------------ device panel

  // A click on a device: its status, open alarms and its last day, a chart per metric with its
  // limits (the domain's, overridden by the device's `thresholds`) and its alarms' start times.
  function openPanel(id) {
    const device = state.devices.get(id);
    if (!device) return;
    if (state.panel && state.panel.id === id) return;
    destroyPlots();
    state.panelToken += 1;
    state.panel = {
      id,
      token: state.panelToken,
      device: null,
      error: null,
      alarms: null,
      past: [],
      series: new Map(),
      from: 0,
      to: 0,
      loadedAt: 0,
      plots: [],
    };
    const box = $("#device-panel");
    box.hidden = false;
    box.dataset.deviceId = id;
    renderPanel();
    if (state.map) {
      // The map is narrower now: keep the device in sight.
      state.map.invalidateSize({ pan: false });
      state.map.panInside(device.marker.getLatLng(), { padding: [48, 48], animate: false });
    }
    loadPanel(state.generation);
  }

  function closePanel() {
    destroyPlots();
    state.panel = null;
    const box = $("#device-panel");
    if (box.hidden) return;
    box.hidden = true;
    box.replaceChildren();
    delete box.dataset.deviceId;
    if (state.map) state.map.invalidateSize({ pan: false });
  }

  function destroyPlots() {
    if (!state.panel) return;
    for (const entry of state.panel.plots) entry.plot.destroy();
    state.panel.plots = [];
  }

  function panelIsCurrent(generation, token) {
    return generation === state.generation && state.panel !== null && state.panel.token === token;
  }

  async function loadPanel(generation) {
    const panel = state.panel;
    if (!panel) return;
    const { id, token } = panel;
    const known = state.devices.get(id);
    const domain = known ? known.props.domain : null;
    const meta = DOMAIN_META.get(domain);
    const to = Date.now();
    const from = Math.floor((to - CHART_HOURS * 3600 * 1000) / CHART_BUCKET_MS) * CHART_BUCKET_MS;
    const path = `/v1/devices/${encodeURIComponent(id)}`;
    const iso = (ms) => encodeURIComponent(new Date(ms).toISOString());
    const range = `from=${iso(from)}&to=${iso(to)}&bucket=${CHART_BUCKET}&agg=avg`;
    const metrics = meta ? meta.metrics.map((m) => m.name) : [];
    panel.loading = true;
    const [device, series] = await Promise.all([
      api(path).then(
        (body) => ({ body }),
        (error) => ({ error }),
      ),
      Promise.all(
        metrics.map((metric) =>
          api(`${path}/series?metric=${encodeURIComponent(metric)}&${range}`).then(
            (body) => ({ metric, body }),
            (error) => ({ metric, error }),
          ),
        ),
      ),
      loadPanelAlarms(generation, token),
    ]);
    panel.loading = false;
    if (!panelIsCurrent(generation, token)) return;
    if (device.error) {
      if (device.error.status === 401) return;
      panel.error = device.error;
    } else {
      Object.assign(panel, { device: device.body, error: null });
    }
    Object.assign(panel, { from, to, loadedAt: Date.now(), series: new Map(series.map((s) => [s.metric, s])) });
    renderPanel();
  }

  async function loadPanelAlarms(generation, token) {
    const panel = state.panel;
    if (!panel) return;
    const base = `/v1/alarms?device_id=${encodeURIComponent(panel.id)}`;
    try {
      const [open, past] = await Promise.all([
        api(`${base}&state=active,acknowledged&limit=50`),
        // Alarms of the day that are over still mark the charts.
        api(`${base}&state=resolved&limit=50`).catch(() => ({ items: [] })),
      ]);
      if (!panelIsCurrent(generation, token)) return;
      panel.alarms = open.items || [];
      panel.past = past.items || [];
      panel.alarmsError = null;
    } catch (error) {
      if (!panelIsCurrent(generation, token)) return;
      panel.alarmsError = error;
    }
    renderPanelAlarms();
    for (const entry of panel.plots) {
      entry.plot.redraw(false, false);
      renderChartNote(entry);
    }
  }

  // On each poll: the panel's alarms, and its charts once they are a few minutes old.
  function refreshPanel(generation) {
    const panel = state.panel;
    if (!panel || !panel.loadedAt || panel.loading) return Promise.resolve();
    if (Date.now() - panel.loadedAt < PANEL_RELOAD_MS) return loadPanelAlarms(generation, panel.token);
    return loadPanel(generation);
  }

  function refreshPanelAlarms(generation) {
    if (state.panel) loadPanelAlarms(generation, state.panel.token);
  }

  function renderPanel() {
    const panel = state.panel;
    const box = $("#device-panel");
    if (!panel) return;
    destroyPlots();
    const close = el("button", {
      type: "button",
      class: "button subtle panel-close",
      "data-testid": "panel-close",
      "aria-label": t("close"),
      title: t("close"),
      text: "×",
    });
    close.addEventListener("click", closePanel);
    box.replaceChildren(
      el("div", { class: "panel-head" }, el("h3", { id: "device-panel-title" }), close),
      el("p", { class: "popup-sub panel-sub" }),
      el("dl", { class: "popup-facts panel-facts", "data-testid": "panel-facts" }),
      el("h4", { text: t("open_alarms") }),
      el("div", { class: "panel-alarms", "data-testid": "panel-alarms" }),
      el("h4", { text: t("last_day") }),
      el("div", { class: "panel-charts", "data-testid": "panel-charts" }),
    );
    renderPanelFacts();
    renderPanelAlarms();
    renderPanelCharts();
  }

  function panelProps() {
    const panel = state.panel;
    const known = state.devices.get(panel.id);
    const device = panel.device || {};
    return {
      ...device,
      ...(known ? known.props : {}),
      areas: (known && known.props.areas) || device.areas || [],
      thresholds: device.thresholds || {},
    };
  }

  function renderPanelFacts() {
    const panel = state.panel;
    const box = $("#device-panel");
    if (!panel || box.hidden) return;
    const p = panelProps();
    box.querySelector("#device-panel-title").textContent = p.name || panel.id;
    box.querySelector(".panel-sub").textContent = [domainTitle(p.domain), p.name ? panel.id : null]
      .filter(Boolean)
      .join(" · ");
    const facts = box.querySelector(".panel-facts");
    const look = markerLook(p);
    const rows = [[t("status"), t(`status_${look.status}`), "status"]];
    if (p.district) rows.push([t("district"), p.district, "district"]);
    rows.push([t("last_reading"), formatTime(p.ts || p.last_seen), "last-reading"]);
    const rank = (id) => (state.areas.has(id) ? AREA_KINDS.indexOf(state.areas.get(id).kind) : AREA_KINDS.length);
    const areas = [...(p.areas || [])]
      .sort((a, b) => rank(a) - rank(b))
      .map((id) => (state.areas.has(id) ? areaName(state.areas.get(id)) : id));
    if (areas.length) rows.push([t("areas"), areas.join(", "), "areas"]);
    facts.replaceChildren(
      ...rows.flatMap(([label, value, name]) => [
        el("dt", { text: label }),
        el("dd", { text: value, "data-fact": name }),
      ]),
    );
  }

  function renderPanelAlarms() {
    const panel = state.panel;
    const box = $("#device-panel .panel-alarms");
    if (!panel || !box) return;
    if (panel.alarmsError) {
      box.replaceChildren(
        el("p", { class: "error", text: t("series_failed", { detail: panel.alarmsError.message }) }),
      );
      return;
    }
    if (panel.alarms === null) {
      box.replaceChildren(el("p", { class: "empty", text: t("loading") }));
      return;
    }
    if (!panel.alarms.length) {
      box.replaceChildren(el("p", { class: "empty", text: t("no_open_alarms") }));
      return;
    }
    box.replaceChildren(
      el(
        "ul",
        { class: "panel-alarm-list" },
        ...[...panel.alarms].sort(alarmOrder).map((alarm) => {
          const messages = alarm.messages || {};
          return el(
            "li",
            {
              class: `panel-alarm sev-${alarm.severity}`,
              "data-testid": "panel-alarm",
              "data-alarm-id": alarm.id,
              "data-severity": alarm.severity,
            },
            el("span", { class: `badge sev-${alarm.severity}`, text: t(`sev_${alarm.severity}`) }),
            el("span", { text: messages[state.lang] || alarm.message || alarm.rule }),
            el("span", {
              class: "panel-alarm-meta",
              text: [t("started", { time: formatTime(alarm.started_at) }), t(`state_${alarm.state}`)].join(" · "),
            }),
          );
        }),
      ),
    );
  }

  function renderPanelCharts() {
    const panel = state.panel;
    const box = $("#device-panel .panel-charts");
    if (!panel || !box) return;
    destroyPlots();
    if (panel.error) {
      box.replaceChildren(el("p", { class: "error", text: t("device_failed", { detail: panel.error.message }) }));
      return;
    }
    if (!panel.device || !panel.loadedAt) {
      box.replaceChildren(el("p", { class: "empty", text: t("loading") }));
      return;
    }
    const domain = panel.device.domain;
    const meta = DOMAIN_META.get(domain);
    const names = meta ? meta.metrics.map((m) => m.name) : [...panel.series.keys()];
    const entries = names.map((name) => chartEntry(domain, name));
    box.replaceChildren(...entries.map((entry) => entry.figure));
    for (const entry of entries) drawChart(entry);
  }

  // A metric's warn and crit limits for this device: the domain's, overridden key by key by the
  // device's `thresholds` (a null there switches a limit off), as the processor applies them.
  function metricLimits(domain, name, thresholds) {
    const meta = metricMeta(domain, name);
    const limits = { ...((meta && meta.limits) || {}) };
    const own = thresholds && thresholds[name];
    if (own && typeof own === "object") {
      for (const key of LIMIT_KEYS) {
        if (!(key in own)) continue;
        if (own[key] === null) delete limits[key];
        else if (typeof own[key] === "number" && Number.isFinite(own[key])) limits[key] = own[key];
      }
    }
    return LIMIT_KEYS.filter((key) => typeof limits[key] === "number").map((key) => ({
      key,
      value: limits[key],
      critical: key.startsWith("crit"),
    }));
  }

  function metricUnit(domain, name) {
    const meta = metricMeta(domain, name);
    const unit = meta ? (meta.unit[state.lang] ?? meta.unit.en) : "";
    return unit === "fraction" ? "%" : unit;
  }

  function chartEntry(domain, name) {
    const panel = state.panel;
    const limits = metricLimits(domain, name, panel.device.thresholds);
    const unit = metricUnit(domain, name);
    const figure = el(
      "figure",
      { class: "chart", "data-testid": "device-chart", "data-metric": name, "data-limits": limits.length },
      el("figcaption", null, el("strong", { text: metricLabel(domain, name) }), unit ? ` (${unit})` : ""),
    );
    const plotBox = el("div", { class: "chart-plot" });
    const note = el("p", { class: "chart-note" });
    figure.append(plotBox, note);
    return { figure, plotBox, note, domain, name, limits, series: panel.series.get(name) || null, plot: null };
  }

  function renderChartNote(entry) {
    const lines = [];
    const limits = entry.limits.map(
      (l) => `${t(`limit_${l.key}`)} ${formatMetric(entry.domain, entry.name, l.value)}`,
    );
    lines.push(`${t("limits")}: ${limits.length ? limits.join(" · ") : t("no_limits")}`);
    const series = entry.series;
    if (series && series.error) lines.push(t("series_failed", { detail: series.error.message }));
    else if (!series || !(series.body.items || []).length) lines.push(t("no_readings"));
    const marks = alarmMarks(entry.name);
    if (marks.length) {
      const list = marks.map((m) => `${formatTime(m.t * 1000)} ${t(`sev_${m.severity}`)}`).join(", ");
      lines.push(t("alarm_marks", { list }));
    }
    entry.figure.dataset.alarmMarks = String(marks.length);
    entry.note.replaceChildren(...lines.map((line) => el("span", { text: line })));
  }

  // The device's alarms (open ones, and those of the day that are over) on this metric, or on the
  // device as a whole (offline, say).
  function alarmMarks(metric) {
    const panel = state.panel;
    if (!panel || !panel.loadedAt) return [];
    const from = panel.from / 1000;
    const to = panel.to / 1000;
    const alarms = [
      ...(panel.alarms || []).map((alarm) => ({ alarm, open: true })),
      ...(panel.past || []).map((alarm) => ({ alarm, open: false })),
    ];
    return alarms
      .filter(({ alarm }) => {
        const metrics = [alarm.metric, ...(alarm.reasons || []).map((r) => String(r.rule).split(".").pop())];
        return !alarm.metric || metrics.includes(metric);
      })
      .map(({ alarm, open }) => ({ t: Date.parse(alarm.started_at) / 1000, severity: alarm.severity, open }))
      .filter((mark) => Number.isFinite(mark.t) && mark.t >= from && mark.t <= to)
      .sort((a, b) => a.t - b.t);
  }

  function palette() {
    const css = getComputedStyle(document.documentElement);
    const value = (name) => css.getPropertyValue(name).trim();
    return {
      accent: value("--accent"),
      text: value("--text"),
      muted: value("--muted"),
      line: value("--line"),
      critical: value("--critical"),
      high: value("--high"),
      medium: value("--medium"),
      low: value("--low"),
    };
  }

  function paddedRange(min, max) {
    if (!Number.isFinite(min) || !Number.isFinite(max)) return [0, 1];
    const pad = min === max ? Math.abs(min) * 0.1 || 1 : (max - min) * 0.08;
    return [min - pad, max + pad];
  }

  function axisValue(domain, name, value) {
    const meta = metricMeta(domain, name);
    if (meta && meta.unit.en === "fraction") {
      return new Intl.NumberFormat(locale(), { style: "percent", maximumFractionDigits: 0 }).format(value);
    }
    return new Intl.NumberFormat(locale(), { maximumFractionDigits: meta ? meta.decimals : 2 }).format(value);
  }

  // A time axis in the city's time, 24-hour: the hour, or the date at midnight.
  function axisTime(seconds) {
    const parts = {};
    const format = new Intl.DateTimeFormat("en-GB", {
      timeZone: CONFIG.timeZone,
      day: "2-digit",
      month: "2-digit",
      hour: "2-digit",
      minute: "2-digit",
      hourCycle: "h23",
    });
    for (const part of format.formatToParts(new Date(seconds * 1000))) parts[part.type] = part.value;
    return parts.hour === "00" && parts.minute === "00"
      ? `${parts.day}/${parts.month}`
      : `${parts.hour}:${parts.minute}`;
  }

  function drawChart(entry) {
    const panel = state.panel;
    renderChartNote(entry);
    if (typeof uPlot === "undefined") return;
    const step = CHART_BUCKET_MS / 1000;
    const from = panel.from / 1000;
    const to = panel.to / 1000;
    // One slot per bucket of the day: a bucket without readings is a gap in the line.
    const xs = [];
    for (let x = from; x < to; x += step) xs.push(x);
    const ys = xs.map(() => null);
    const items = (entry.series && entry.series.body && entry.series.body.items) || [];
    for (const item of items) {
      const index = Math.floor((Date.parse(item.t) / 1000 - from) / step);
      if (index >= 0 && index < xs.length && typeof item.value === "number") ys[index] = item.value;
    }
    // A bucket between two gaps is a point, or it would not show at all.
    const lone = ys
      .map((v, i) => (v !== null && ys[i - 1] == null && ys[i + 1] == null ? i : -1))
      .filter((i) => i >= 0);
    const colors = palette();
    const { domain, name } = entry;
    const format = (u, v) => (v === null || v === undefined ? "—" : formatMetric(domain, name, v));
    const axis = {
      stroke: colors.muted,
      grid: { stroke: colors.line, width: 1 },
      ticks: { stroke: colors.line, width: 1 },
    };
    const options = {
      width: Math.max(240, entry.plotBox.clientWidth),
      height: 170,
      tzDate: CONFIG.timeZone ? (ts) => uPlot.tzDate(new Date(ts * 1000), CONFIG.timeZone) : undefined,
      scales: {
        x: { time: true, range: () => [from, to] },
        y: { range: (u, min, max) => paddedRange(min, max) },
      },
      series: [
        { label: t("time"), value: (u, v) => (v === null || v === undefined ? "—" : formatTime(v * 1000)) },
        {
          label: metricLabel(domain, name),
          stroke: colors.accent,
          width: 2,
          spanGaps: false,
          value: format,
          points: { size: 6, filter: (u, seriesIndex, show) => (show ? null : lone) },
        },
        ...entry.limits.map((limit) => ({
          label: t(`limit_${limit.key}`),
          stroke: limit.critical ? colors.critical : colors.medium,
          width: 1.5,
          dash: [6, 4],
          points: { show: false },
          value: format,
        })),
      ],
      axes: [
        { ...axis, values: (u, splits) => splits.map(axisTime) },
        { ...axis, size: 60, values: (u, splits) => splits.map((v) => axisValue(domain, name, v)) },
      ],
      legend: { live: true },
      hooks: { draw: [(u) => drawAlarmMarks(u, name)] },
    };
    const data = [xs, ys, ...entry.limits.map((limit) => xs.map(() => limit.value))];
    entry.plot = new uPlot(options, data, entry.plotBox);
    panel.plots.push(entry);
  }

  function drawAlarmMarks(u, metric) {
    const marks = alarmMarks(metric);
    if (!marks.length) return;
    const colors = palette();
    const ratio = window.devicePixelRatio || 1;
    const { ctx } = u;
    const { left, top, width, height } = u.bbox;
    ctx.save();
    ctx.setLineDash([]);
    ctx.lineWidth = 1.5 * ratio;
    for (const mark of marks) {
      const x = Math.round(u.valToPos(mark.t, "x", true));
      if (x < left || x > left + width) continue;
      const color = colors[mark.severity] || colors.muted;
      ctx.globalAlpha = mark.open ? 1 : 0.5;
      ctx.strokeStyle = color;
      ctx.fillStyle = color;
      ctx.beginPath();
      ctx.moveTo(x, top);
      ctx.lineTo(x, top + height);
      ctx.stroke();
      ctx.beginPath();
      ctx.moveTo(x - 5 * ratio, top);
      ctx.lineTo(x + 5 * ratio, top);
      ctx.lineTo(x, top + 8 * ratio);
      ctx.closePath();
      ctx.fill();
    }
    ctx.restore();
  }

  function resizePlots() {
    if (!state.panel) return;
    for (const entry of state.panel.plots) {
      const width = Math.max(240, entry.plotBox.clientWidth);
      if (width !== entry.plot.width) entry.plot.setSize({ width, height: entry.plot.height });
    }
  }

  // ------------------------------------------------------------------ the event stream

  async function runStream(generation) {
    let attempt = 0;
    while (generation === state.generation && state.key) {
      const controller = new AbortController();
      state.streamAbort = controller;
      let wait = null; // set by the answer when it says how long to wait
      let watchdog = null;
      const feed = () => {
        clearTimeout(watchdog);
        watchdog = setTimeout(() => controller.abort(), STREAM_IDLE_MS);
      };
      try {
        const headers = { "X-API-Key": state.key, Accept: "text/event-stream" };
        if (state.lastEventId) headers["Last-Event-ID"] = state.lastEventId;
        feed();
        const response = await fetch(`/v1/stream?${cityQuery(state.city)}`, {
          headers,
          cache: "no-store",
          signal: controller.signal,
        });
        const type = response.headers.get("content-type") || "";
        if (response.status === 401) {
          clearTimeout(watchdog);
          unauthorized();
          return;
        }
        if (!response.ok || !response.body || !type.startsWith("text/event-stream")) {
          const retryAfter = Number(response.headers.get("retry-after"));
          if (response.status === 409) {
            // Away longer than the server replays: start afresh at once; reconnecting reloads
            // everything the stream could not replay.
            state.lastEventId = null;
            wait = 0;
          } else if (response.status === 404 || response.status === 405 || response.status === 501) {
            wait = STREAM_MISSING_MS;
          } else if (Number.isFinite(retryAfter) && retryAfter > 0) {
            wait = Math.min(retryAfter, 300) * 1000;
          }
          response.body?.cancel().catch(() => {});
          throw new Error(`stream answered ${response.status}`);
        }
        if (generation !== state.generation) return;
        state.retryMs = state.retryBaseMs;
        state.live = true;
        setConnection("live");
        schedulePoll(generation);
        if (attempt > 0) refreshAll(generation); // whatever the stream could not replay
        await readEvents(response.body, feed, (event) => {
          state.retryMs = state.retryBaseMs;
          if (generation === state.generation) handleEvent(event);
        });
      } catch {
        // Aborted by a city change or stop, or by the watchdog; or the network failed.
      } finally {
        clearTimeout(watchdog);
      }
      if (generation !== state.generation) return;
      state.live = false;
      setConnection("polling");
      schedulePoll(generation);
      attempt += 1;
      let delay = wait;
      if (delay === null) {
        delay = state.retryMs + Math.random() * Math.min(state.retryMs, 5000); // with jitter
        state.retryMs = Math.min(state.retryMs * 2, 30000);
      }
      await sleep(delay);
    }
  }

  // The text/event-stream format (WHATWG HTML, "Server-sent events").
  async function readEvents(body, onBytes, onEvent) {
    const reader = body.getReader();
    const decoder = new TextDecoder("utf-8");
    let buffer = "";
    let data = [];
    let type = "";
    const line = (text) => {
      if (text === "") {
        if (data.length) onEvent({ type: type || "message", data: data.join("\n"), id: state.lastEventId });
        data = [];
        type = "";
        return;
      }
      if (text.startsWith(":")) return; // a comment: heartbeat
      const colon = text.indexOf(":");
      const field = colon < 0 ? text : text.slice(0, colon);
      let value = colon < 0 ? "" : text.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") type = value;
      else if (field === "data") data.push(value);
      else if (field === "id" && !value.includes("\0")) state.lastEventId = value || null;
      else if (field === "retry" && /^\d+$/.test(value)) {
        state.retryBaseMs = Math.max(500, Number(value));
        state.retryMs = state.retryBaseMs;
      }
    };
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        onBytes();
        buffer += decoder.decode(value, { stream: true });
        let start = 0;
        for (let i = 0; i < buffer.length; i += 1) {
          const char = buffer[i];
          if (char !== "\n" && char !== "\r") continue;
          if (char === "\r" && i + 1 === buffer.length) break; // maybe \r\n across chunks
          line(buffer.slice(start, i));
          if (char === "\r" && buffer[i + 1] === "\n") i += 1;
          start = i + 1;
        }
        buffer = buffer.slice(start);
        if (buffer.length > 1 << 20) throw new Error("event too large");
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  function handleEvent(event) {
    const message = readJson(event.data, null);
    if (!message || typeof message !== "object") return;
    // CloudEvents carry the payload in `data`.
    const data = message.specversion || ("type" in message && "data" in message) ? message.data : message;
    if (!data || typeof data !== "object") return;
    if (data.city && data.city !== state.city) return;
    if (event.type === "state") {
      for (const item of data.items || []) {
        if (!item || !item.device_id) continue;
        updateDevice(
          String(item.device_id),
          { status: item.status, ts: item.ts, metrics: item.metrics },
          data.domain || item.domain,
        );
      }
    } else if (event.type === "status") {
      if (data.device_id) updateDevice(String(data.device_id), { status: data.status }, data.domain);
      requestRefresh("summary", "areas");
    } else if (event.type === "alarm") {
      if (data.id !== undefined && data.state) {
        const outside = state.alarmArea && !(data.areas || []).includes(state.alarmArea);
        if (data.state === "resolved" || outside) state.alarms.delete(data.id);
        else state.alarms.set(data.id, data);
        renderAlarms(false);
      }
      const panel = state.panel && data.device_id && String(data.device_id) === state.panel.id;
      requestRefresh(
        "alarms",
        "summary",
        "areas",
        ...(data.domain ? [`layer:${data.domain}`] : []),
        ...(panel ? ["panel-alarms"] : []),
      );
    }
  }

  // ------------------------------------------------------------------ wiring

  // ------------------------------------------------------------------ incidents
  // The city's open incidents (alarms grouped by place and kind, `/v1/incidents`), polled with
  // If-None-Match on a timer of their own: incidents follow their alarms by a grouping job, not
  // by a stream event. A click opens one incident's alarms, checklist and timeline.

  const INCIDENT_POLL_MS = 5000;
  const INCIDENT_STATES = "open,acknowledged,in_progress";
  Object.assign(TEXT.vi, {
    incidents: "Sự cố đang xử lý",
    no_incidents: "Không có sự cố nào đang mở.",
    incident_state_open: "Mới",
    incident_state_acknowledged: "Đã tiếp nhận",
    incident_state_in_progress: "Đang xử lý",
    incident_state_resolved: "Đã xử lý xong",
    incident_state_closed: "Đã đóng",
    incident_alarms: "Cảnh báo của sự cố",
    incident_checklist: "Quy trình xử lý",
    incident_timeline: "Diễn biến",
    incident_agency: "Đơn vị: {agency}",
    incident_unassigned: "Chưa giao đơn vị",
    incident_alarm_n: "{n} cảnh báo",
    incident_city_wide: "Toàn thành phố",
    incident_failed: "Không tải được sự cố: {detail}",
  });
  Object.assign(TEXT.en, {
    incidents: "Open incidents",
    no_incidents: "No open incidents.",
    incident_state_open: "New",
    incident_state_acknowledged: "Acknowledged",
    incident_state_in_progress: "In progress",
    incident_state_resolved: "Resolved",
    incident_state_closed: "Closed",
    incident_alarms: "The incident's alarms",
    incident_checklist: "Procedure",
    incident_timeline: "Timeline",
    incident_agency: "Agency: {agency}",
    incident_unassigned: "No agency assigned",
    incident_alarm_n: "{n} alarms",
    incident_city_wide: "Whole city",
    incident_failed: "Could not load the incident: {detail}",
  });
  const incidents = { items: [], etag: null, selected: null, detail: null, error: null };

  function setupIncidents() {
    const section = el(
      "section",
      { class: "incidents", "aria-labelledby": "incidents-heading", "data-testid": "incidents-panel" },
      el(
        "h2",
        { id: "incidents-heading" },
        el("span", { "data-i18n": "incidents", text: t("incidents") }),
        " ",
        el("span", { id: "incident-count", class: "count" }),
      ),
      el("ol", { id: "incident-list", class: "incident-list", "data-testid": "incident-list", "aria-live": "polite" }),
      el("p", { id: "incidents-empty", class: "empty", "data-i18n": "no_incidents", text: t("no_incidents") }),
      el("div", { id: "incident-detail", class: "incident-detail", "data-testid": "incident-detail", hidden: true }),
    );
    $("#board").append(section);
    $("#board").classList.add("has-incidents");
    section.addEventListener("click", (event) => {
      const box = event.target.closest("input[data-step]");
      if (box) {
        tickStep(box);
        return;
      }
      const row = event.target.closest("[data-incident-id]");
      if (row) selectIncident(Number(row.dataset.incidentId));
    });
    section.addEventListener("keydown", (event) => {
      const row = event.target.closest("li[data-incident-id]");
      if (row && (event.key === "Enter" || event.key === " ")) {
        event.preventDefault();
        selectIncident(Number(row.dataset.incidentId));
      }
    });
  }

  function resetIncidents(generation) {
    incidents.items = [];
    incidents.etag = null;
    incidents.selected = null;
    incidents.detail = null;
    incidents.error = null;
    renderIncidents();
    pollIncidents(generation);
  }

  // Its own loop per city: a loop of an older generation ends at its next turn.
  function pollIncidents(generation) {
    setTimeout(() => {
      if (generation !== state.generation) return;
      refreshIncidents(generation).finally(() => pollIncidents(generation));
    }, INCIDENT_POLL_MS);
  }

  function refreshIncidents(generation) {
    return guarded(generation, async () => {
      const city = state.city;
      if (!city) return;
      const answer = await apiIfChanged(
        `/v1/incidents?state=${INCIDENT_STATES}&${cityQuery(city)}&limit=${ALARM_PAGE}`,
        incidents.etag,
      );
      if (generation !== state.generation || city !== state.city) return;
      if (answer.changed) {
        incidents.etag = answer.etag;
        incidents.items = answer.body.items || [];
        renderIncidents();
        if (incidents.selected !== null) await loadIncident(generation, incidents.selected);
      }
    });
  }

  async function selectIncident(id) {
    incidents.selected = incidents.selected === id ? null : id;
    incidents.detail = null;
    incidents.error = null;
    renderIncidents();
    if (incidents.selected !== null) await loadIncident(state.generation, id);
  }

  async function loadIncident(generation, id) {
    try {
      const detail = await api(`/v1/incidents/${id}`);
      if (generation !== state.generation || incidents.selected !== id) return;
      incidents.detail = detail;
      incidents.error = null;
    } catch (error) {
      if (generation !== state.generation || incidents.selected !== id) return;
      incidents.error = (error.problem && error.problem.detail) || String(error.status);
    }
    renderIncidentDetail();
  }

  async function tickStep(box) {
    const id = incidents.selected;
    if (id === null) return;
    box.disabled = true;
    try {
      incidents.detail = await api(`/v1/incidents/${id}/checklist/${encodeURIComponent(box.dataset.step)}`, {
        method: "POST",
        body: { done: box.checked },
      });
    } catch (error) {
      reportError(error);
    }
    renderIncidentDetail();
  }

  function incidentTitle(incident) {
    return (incident.title && incident.title[state.lang]) || (incident.title && incident.title.vi) || incident.kind;
  }

  function incidentPlace(incident) {
    if (!incident.area) return t("incident_city_wide");
    const area = state.areas.get(incident.area);
    return area ? areaName(area) : incident.area;
  }

  function renderIncidents() {
    const list = $("#incident-list");
    if (!list) return;
    list.replaceChildren(
      ...incidents.items.map((incident) =>
        el(
          "li",
          {
            class: `incident sev-${incident.severity}${incident.id === incidents.selected ? " selected" : ""}`,
            "data-testid": "incident",
            "data-incident-id": incident.id,
            "data-severity": incident.severity,
            "data-state": incident.state,
            tabindex: 0,
            role: "button",
            "aria-expanded": incident.id === incidents.selected ? "true" : "false",
          },
          el(
            "div",
            { class: "alarm-head" },
            el("span", { class: `badge sev-${incident.severity}`, text: t(`sev_${incident.severity}`) }),
            el("span", { class: "incident-title", text: incidentTitle(incident) }),
            el("span", { class: "alarm-state", text: t(`incident_state_${incident.state}`) }),
          ),
          el(
            "p",
            { class: "alarm-meta" },
            [
              incidentPlace(incident),
              incident.agency_id ? t("incident_agency", { agency: incident.agency_id }) : t("incident_unassigned"),
              t("incident_alarm_n", { n: incident.alarm_count }),
              t("started", { time: formatTime(incident.opened_at) }),
            ].join(" · "),
          ),
        ),
      ),
    );
    $("#incident-count").textContent = incidents.items.length ? `(${incidents.items.length})` : "";
    $("#incidents-empty").hidden = incidents.items.length > 0;
    renderIncidentDetail();
  }

  function renderIncidentDetail() {
    const box = $("#incident-detail");
    if (!box) return;
    const detail = incidents.detail;
    box.hidden = incidents.selected === null;
    if (box.hidden) {
      box.replaceChildren();
      return;
    }
    if (incidents.error) {
      box.replaceChildren(el("p", { class: "empty", text: t("incident_failed", { detail: incidents.error }) }));
      return;
    }
    if (!detail || detail.id !== incidents.selected) {
      box.replaceChildren(el("p", { class: "empty", text: t("loading") }));
      return;
    }
    const closed = detail.state === "closed";
    box.replaceChildren(
      el("h3", { text: incidentTitle(detail) }),
      el("h4", { text: t("incident_alarms") }),
      el(
        "ul",
        { class: "incident-alarms", "data-testid": "incident-alarms" },
        ...(detail.alarms || []).map((alarm) =>
          el(
            "li",
            { class: `sev-${alarm.severity}`, "data-alarm-id": alarm.id },
            el("span", { class: `badge sev-${alarm.severity}`, text: t(`sev_${alarm.severity}`) }),
            " ",
            `${alarm.device_id || alarm.subject} — ${alarm.message}`,
          ),
        ),
      ),
      el("h4", { text: t("incident_checklist") }),
      el(
        "ul",
        { class: "incident-checklist", "data-testid": "incident-checklist" },
        ...(detail.checklist || []).map((step) =>
          el(
            "li",
            {},
            el(
              "label",
              {},
              el("input", {
                type: "checkbox",
                "data-step": step.id,
                checked: step.done,
                disabled: closed,
              }),
              " ",
              step[state.lang] || step.vi,
            ),
          ),
        ),
      ),
      el("h4", { text: t("incident_timeline") }),
      el(
        "ol",
        { class: "incident-timeline", "data-testid": "incident-timeline" },
        ...(detail.timeline || []).map((entry) =>
          el(
            "li",
            {},
            [formatTime(entry.at), entry.actor, entry.action, entry.note].filter(Boolean).join(" · "),
          ),
        ),
      ),
    );
  }

  function wire() {
    setupIncidents();
    $("#language").addEventListener("click", () => setLanguage(state.lang === "vi" ? "en" : "vi"));
    $("#city").addEventListener("change", (event) => {
      if (event.target.value && event.target.value !== state.city) selectCity(event.target.value);
    });
    $("#forget-key").addEventListener("click", () => {
      state.key = null;
      sessionStorage.removeItem(STORE.key);
      showKeyForm(null);
    });
    $("#key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("#key-input").value.trim();
      if (!key) return;
      state.key = key;
      sessionStorage.setItem(STORE.key, key);
      begin();
    });
    $("#layer-toggles").addEventListener("click", (event) => {
      const button = event.target.closest("button[data-domain]");
      if (button) toggleDomain(button.dataset.domain);
    });
    $("#area-toggles").addEventListener("click", (event) => {
      const button = event.target.closest("button[data-kind]");
      if (button) toggleAreaKind(button.dataset.kind);
    });
    $("#alarm-area").addEventListener("change", (event) => setAlarmArea(event.target.value));
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && state.panel) closePanel();
    });
    new ResizeObserver(() => resizePlots()).observe($("#device-panel"));
    $("#alarm-list").addEventListener("click", (event) => {
      const button = event.target.closest("button[data-action]");
      if (!button || button.disabled) return;
      const row = button.closest("[data-alarm-id]");
      if (button.dataset.action === "ack") acknowledge(button);
      else if (button.dataset.action === "locate" && row) {
        const alarm = state.alarms.get(Number(row.dataset.alarmId)) || state.alarms.get(row.dataset.alarmId);
        if (alarm) locateAlarm(alarm);
      }
    });
    window.addEventListener("hashchange", () => {
      if (takeKeyFromFragment()) begin();
    });
  }

  function main() {
    wire();
    applyLanguage();
    takeKeyFromFragment();
    state.key = state.key || sessionStorage.getItem(STORE.key);
    if (state.key) begin();
    else showKeyForm(null);
  }

  main();
})();
