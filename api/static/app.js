// The operations page: devices on a map, open alarms with acknowledge buttons, per-domain summary
// tiles, live over the API's event stream. Plain JavaScript, no build step; Leaflet is vendored.
//
// The API key comes from the URL fragment (`/#key=...`, never sent to the server), is kept in
// sessionStorage and sent as `X-API-Key`. EventSource cannot send headers, so the stream is read
// with fetch() and parsed here; when it is unavailable the page polls.
"use strict";

(() => {
  const STORE = { key: "ioc.apiKey", lang: "ioc.lang", city: "ioc.city", hidden: "ioc.hiddenDomains" };
  const LANGS = ["vi", "en"];
  const SEVERITIES = ["critical", "high", "medium", "low"];
  const RANK = { low: 1, medium: 2, high: 3, critical: 4 };
  const STATUSES = ["online", "offline", "unknown"];
  const POLL_MS = 10000; // without the stream
  const POLL_LIVE_MS = 60000; // with the stream, as a safety net
  const STREAM_IDLE_MS = 45000; // no byte (not even a heartbeat) for this long: reconnect
  const STREAM_MISSING_MS = 60000; // the API has no stream (404/501): try again this much later
  const ALARM_PAGE = 200;

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
      district_alarm: "Cảnh báo toàn quận",
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
      district_alarm: "District-wide alarm",
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
    map: null,
    groups: new Map(), // domain -> L.LayerGroup
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
    if (!response.ok) {
      const problem = await response.json().catch(() => null);
      const error = new ApiError(response.status, problem);
      if (response.status === 401) unauthorized();
      throw error;
    }
    return response.status === 204 ? null : response.json();
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
    renderLegend();
    renderSummary();
    renderAlarms(true);
    for (const device of state.devices.values()) {
      if (device.marker.isPopupOpen()) device.marker.getPopup().update();
    }
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
    state.summary = null;
    for (const group of state.groups.values()) group.clearLayers();
    state.devices.clear();
    renderAlarms(true);
    renderSummary();
    renderToggles();
    state.fitted = false;
    state.userMoved = false;
    fitCity();
    setConnection("connecting");
    const generation = state.generation;
    refreshAll(generation).finally(() => schedulePoll(generation));
    runStream(generation);
  }

  // ------------------------------------------------------------------ refreshing

  async function refreshAll(generation) {
    await Promise.all([
      refreshCities(generation),
      refreshSummary(generation),
      refreshAlarms(generation),
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
      const page = await api(
        `/v1/alarms?state=active,acknowledged&${cityQuery(state.city)}&limit=${ALARM_PAGE}`,
      );
      if (generation !== state.generation) return;
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
      if (!state.fitted && !cityBounds() && state.devices.size) fitDevices();
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
    if (cityBounds()) fitCity();
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

  function fitCity() {
    if (!state.map) return;
    const bounds = cityBounds();
    const info = cityInfo();
    if (bounds && bounds.isValid()) {
      if (bounds.getNorthEast().equals(bounds.getSouthWest())) state.map.setView(bounds.getCenter(), 15);
      else state.map.fitBounds(bounds, { padding: [24, 24], maxZoom: 16 });
      state.fitted = true;
    } else if (info && info.center && Number.isFinite(info.center.lat) && Number.isFinite(info.center.lon)) {
      state.map.setView([info.center.lat, info.center.lon], 12);
    }
  }

  function fitDevices() {
    const points = [...state.devices.values()].map((d) => d.marker.getLatLng());
    if (!points.length) return;
    state.map.fitBounds(L.latLngBounds(points), { padding: [24, 24], maxZoom: 15 });
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
    const district = worstSeverity(p.district_alarm_severity);
    if (district) add(t("district_alarm"), t(`sev_${district}`));
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
    state.map.setView(device.marker.getLatLng(), Math.max(state.map.getZoom(), 15), { animate: false });
    device.marker.openPopup();
  }

  // A district-wide alarm: its domain's devices in that district.
  function districtDevices(alarm) {
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
      requestRefresh("summary");
    } else if (event.type === "alarm") {
      if (data.id !== undefined && data.state) {
        if (data.state === "resolved") state.alarms.delete(data.id);
        else state.alarms.set(data.id, data);
        renderAlarms(false);
      }
      requestRefresh("alarms", "summary", ...(data.domain ? [`layer:${data.domain}`] : []));
    }
  }

  // ------------------------------------------------------------------ wiring

  function wire() {
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
