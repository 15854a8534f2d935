// lookalike's page: a plain client of the public HTTP API (POST /jobs, job events, long poll).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const FINAL = new Set(["succeeded", "failed"]);
  const THUMB_CSS_PX = 128; // keep in step with --thumb in app.css
  const POLL_WAIT_S = 25;
  const READY_EVERY_MS = 15000;
  const UNREACHABLE = "The service cannot be reached; check that it runs and retry.";
  const KEY_STORE = "lookalike-api-key";

  const state = {
    run: 0, // bumped by every new query: older ones stop updating the page
    file: null, // the last image, so "Search" can send it again with another k or gallery
    queryUrl: null, // object URL of that image
    gridUrl: null,
    stopStream: null, // closes the open EventSource, if any
    step: "upload", // the step shown as current
    key: sessionStorage.getItem(KEY_STORE) || "",
  };

  class ApiError extends Error {
    constructor(message, status) {
      super(message);
      this.status = status;
    }
  }

  // ---- talking to the API ----------------------------------------------------------------

  function authHeaders() {
    return state.key ? { "X-API-Key": state.key } : {};
  }

  function apiError(status, body, retryAfter) {
    let message = `The service answered with status ${status}.`;
    if (body && typeof body.detail === "string") message = body.detail;
    else if (body && Array.isArray(body.detail) && body.detail[0]?.msg) message = body.detail[0].msg;
    if (retryAfter && (status === 429 || status === 503)) message += ` Retry in ${retryAfter} s.`;
    if (status === 401) $("key-field").hidden = false;
    return new ApiError(message, status);
  }

  async function getJson(path) {
    let reply;
    try {
      reply = await fetch(path, { headers: { Accept: "application/json", ...authHeaders() } });
    } catch {
      throw new ApiError(UNREACHABLE, 0);
    }
    const body = await reply.json().catch(() => null);
    if (!reply.ok) throw apiError(reply.status, body, reply.headers.get("Retry-After"));
    return body;
  }

  // XMLHttpRequest rather than fetch: it reports upload progress.
  function postJob(form, onProgress) {
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", "/jobs");
      xhr.responseType = "json";
      xhr.setRequestHeader("Accept", "application/json");
      for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
      xhr.upload.onprogress = (event) => {
        if (event.lengthComputable) onProgress(event.loaded / event.total);
      };
      xhr.onload = () => {
        if (xhr.status >= 200 && xhr.status < 300 && xhr.response) resolve(xhr.response);
        else reject(apiError(xhr.status, xhr.response, xhr.getResponseHeader("Retry-After")));
      };
      xhr.onerror = () => reject(new ApiError(UNREACHABLE, 0));
      xhr.send(form);
    });
  }

  // Server-Sent Events first; null when the stream breaks before the end (or is missing).
  function streamJob(id, run) {
    if (!window.EventSource || state.key) return Promise.resolve(null); // EventSource has no headers
    return new Promise((resolve) => {
      const source = new EventSource(`/jobs/${encodeURIComponent(id)}/events`);
      const finish = (job) => {
        source.close();
        state.stopStream = null;
        resolve(job);
      };
      state.stopStream = () => finish(null);
      source.addEventListener("job", (event) => {
        if (run !== state.run) return finish(null);
        let job;
        try {
          job = JSON.parse(event.data);
        } catch {
          return finish(null);
        }
        showJob(job);
        if (FINAL.has(job.status)) finish(job);
      });
      source.onerror = () => finish(null);
    });
  }

  async function pollJob(id, run) {
    for (let failures = 0; run === state.run; ) {
      try {
        const job = await getJson(`/jobs/${encodeURIComponent(id)}?wait=${POLL_WAIT_S}`);
        if (run !== state.run) break;
        failures = 0;
        showJob(job);
        if (FINAL.has(job.status)) return job;
      } catch (error) {
        const transient = error.status === 0 || error.status === 429 || error.status >= 500;
        if (!transient || ++failures > 5) throw error;
        $("progress-text").textContent = `${error.message} Trying again…`;
        await new Promise((wake) => setTimeout(wake, 1000 * failures));
      }
    }
    return null;
  }

  // ---- a query from start to end ---------------------------------------------------------

  async function search(query) {
    const run = ++state.run;
    state.stopStream?.();
    const form = new FormData();
    if (query.file) form.append("file", query.file, query.file.name || "pasted.png");
    else form.append("text", query.text);
    const k = $("k").value.trim();
    if (k) form.append("k", k);
    if (!$("gallery-field").hidden && $("gallery").value) form.append("gallery", $("gallery").value);

    resetResults(query);
    try {
      const created = await postJob(form, (share) => {
        if (run === state.run) showUpload(share);
      });
      if (run !== state.run) return;
      $("upload").hidden = true;
      showJob(created);
      // Follow it over the event stream; long poll when the stream is missing or breaks.
      if (!FINAL.has(created.status) && !(await streamJob(created.id, run))) {
        await pollJob(created.id, run);
      }
    } catch (error) {
      if (run !== state.run) return;
      showError(error.message);
      setStep(state.step, null, "failed"); // the step that went wrong turns red
      $("upload").hidden = true;
      $("progress-text").textContent = "";
      $("results").dataset.status = "error";
    } finally {
      if (run === state.run) $("go").disabled = false;
    }
  }

  function startImage(file) {
    if (!file) return;
    state.file = file;
    $("text").value = "";
    search({ file });
  }

  function onSubmit(event) {
    event.preventDefault();
    const text = $("text").value.trim();
    if (text && !$("text").disabled) search({ text });
    else if (state.file) search({ file: state.file });
    else showError("Choose an image or type a text query first.");
  }

  // ---- showing it ------------------------------------------------------------------------

  function showError(message) {
    $("error").textContent = message;
    $("error").hidden = !message;
  }

  function resetResults(query) {
    showError("");
    $("go").disabled = true;
    $("results").hidden = false;
    $("results").dataset.status = "uploading";
    $("matches").replaceChildren();
    $("meta-text").textContent = "";
    $("grid-link").hidden = true;
    $("random-warning").hidden = true;
    $("upload").value = 0;
    $("upload").hidden = !query.file;
    setStep("upload", query.file ? "Upload" : "Send");
    $("progress-text").textContent = query.file ? "Uploading…" : "Sending…";
    showQuery(query);
  }

  function showQuery(query) {
    const view = $("query-view");
    if (query.file) {
      if (state.queryUrl) URL.revokeObjectURL(state.queryUrl);
      state.queryUrl = URL.createObjectURL(query.file);
      const img = new Image();
      img.alt = `Your image${query.file.name ? `: ${query.file.name}` : ""}`;
      img.src = state.queryUrl;
      img.onload = () => img.classList.toggle("pixelated", img.naturalWidth <= 96);
      img.onerror = () => view.replaceChildren(placeholder("No preview for this file"));
      view.replaceChildren(img);
    } else {
      const quote = document.createElement("blockquote");
      quote.className = "query-text";
      quote.textContent = `“${query.text}”`;
      view.replaceChildren(quote);
    }
  }

  function showUpload(share) {
    const percent = Math.round(share * 100);
    $("upload").value = percent;
    $("progress-text").textContent = percent < 100 ? `Uploading… ${percent}%` : "Checking the image…";
  }

  const STEPS = { upload: "Upload", queued: "Queued", running: "Running", done: "Done" };
  const ORDER = Object.keys(STEPS);

  // Steps before `current` are ticked, `current` is highlighted (with `label`, if given).
  function setStep(current, label, tone = "") {
    const at = ORDER.indexOf(current);
    state.step = current;
    for (const item of $("steps").children) {
      const index = ORDER.indexOf(item.dataset.step);
      item.className = index < at ? "past" : index === at ? `current ${tone}` : "";
      if (index === at) item.setAttribute("aria-current", "step");
      else item.removeAttribute("aria-current");
      if (index !== at) item.textContent = STEPS[item.dataset.step];
      else if (label) item.textContent = label;
    }
  }

  function showJob(job) {
    $("results").dataset.status = job.status;
    const status = $("progress-text");
    if (job.status === "queued") {
      setStep("queued", "Queued");
      status.textContent = "Waiting for a worker…";
    } else if (job.status === "running") {
      setStep("running", job.stage ? `Running · ${job.stage}` : "Running");
      status.textContent = job.stage ? `A worker is ${job.stage} your query…` : "A worker took it…";
    } else if (job.status === "succeeded") {
      setStep("done", "Done", "succeeded");
      showResult(job);
    } else if (job.status === "failed") {
      setStep("done", "Failed", "failed");
      status.textContent = "";
      showError(job.error || "The job failed.");
    }
    if (job.attempts > 1 && !FINAL.has(job.status)) status.textContent += ` (attempt ${job.attempts})`;
  }

  function showResult(job) {
    const result = job.result || {};
    const matches = result.matches || [];
    const gallery = result.gallery?.name || job.gallery || "";
    $("matches").replaceChildren(...matches.map((match) => matchItem(match, gallery)));
    const total = result.timings?.total_ms;
    $("progress-text").textContent =
      `${matches.length} ${matches.length === 1 ? "match" : "matches"}` +
      (total !== undefined ? ` in ${formatMs(total)}` : "") + ".";
    $("random-warning").hidden = !result.model_is_random;
    $("random-model").textContent = result.model || "random weights";
    $("meta-text").textContent = describe(result);
    offerGrid(job.id);
  }

  function matchItem(match, gallery) {
    const item = document.createElement("li");
    item.className = "match";
    const figure = document.createElement("figure");
    const frame = document.createElement("div");
    frame.className = "thumb";
    const img = new Image(THUMB_CSS_PX, THUMB_CSS_PX);
    const name = match.label_name || `class ${match.label}`;
    img.alt = `Rank ${match.rank}: ${name}, score ${formatScore(match.score)}`;
    img.decoding = "async";
    img.src = thumbUrl(match, gallery);
    img.onerror = () => frame.replaceChildren(placeholder(name));
    const rank = document.createElement("span");
    rank.className = "rank";
    rank.textContent = `#${match.rank}`;
    rank.setAttribute("aria-hidden", "true");
    frame.append(img, rank);

    const caption = document.createElement("figcaption");
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = name;
    const score = document.createElement("span");
    score.className = "score";
    score.title = "Cosine similarity";
    score.textContent = formatScore(match.score);
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.setAttribute("aria-hidden", "true");
    bar.style.setProperty("--score", String(Math.max(0, Math.min(1, match.score))));
    caption.append(label, score, bar);
    figure.append(frame, caption);
    item.append(figure);
    return item;
  }

  function thumbUrl(match, gallery) {
    const base = match.image_url || `/gallery/${match.index}.png?gallery=${encodeURIComponent(gallery)}`;
    const url = new URL(base, location.href);
    const px = Math.round(THUMB_CSS_PX * (window.devicePixelRatio || 1));
    url.searchParams.set("size", String(Math.max(16, Math.min(512, px))));
    return url.pathname + url.search;
  }

  function placeholder(text) {
    const box = document.createElement("span");
    box.className = "placeholder";
    box.textContent = text;
    return box;
  }

  // The grid is fetched (not linked) so that an API key can travel with it and a missing
  // route simply hides the link.
  async function offerGrid(id) {
    const run = state.run;
    try {
      const reply = await fetch(`/jobs/${encodeURIComponent(id)}/grid.png`, { headers: authHeaders() });
      if (!reply.ok || run !== state.run) return;
      const blob = await reply.blob();
      if (run !== state.run) return;
      if (state.gridUrl) URL.revokeObjectURL(state.gridUrl);
      state.gridUrl = URL.createObjectURL(blob);
      const link = $("grid-link");
      link.href = state.gridUrl;
      link.download = `lookalike-${id.slice(0, 8)}.png`;
      link.hidden = false;
    } catch {
      // No picture to offer; the matches are on the page already.
    }
  }

  function describe(result) {
    const parts = [];
    if (result.gallery) parts.push(`${result.gallery.name} (${formatCount(result.gallery.size)} images)`);
    if (result.model) parts.push(result.model);
    if (result.device) parts.push(result.device);
    const t = result.timings;
    if (t) {
      const split = [["queue", t.queue_wait_ms], ["embed", t.embed_ms], ["search", t.search_ms]];
      parts.push(split.filter(([, ms]) => ms !== undefined).map(([n, ms]) => `${n} ${formatMs(ms)}`).join(", "));
    }
    return parts.join(" · ");
  }

  const formatScore = (score) => (typeof score === "number" ? score.toFixed(3) : "?");
  const formatCount = (n) => (typeof n === "number" ? n.toLocaleString("en") : "?");
  const formatMs = (ms) => (ms >= 1000 ? `${(ms / 1000).toFixed(1)} s` : `${ms < 10 ? ms.toFixed(1) : Math.round(ms)} ms`);

  // ---- service readiness and galleries ---------------------------------------------------

  async function checkReady() {
    const line = $("readiness");
    try {
      const ready = await getJson("/readyz");
      const workers = Array.isArray(ready.workers) ? ready.workers.length : 0;
      line.dataset.state = "ready";
      $("readiness-text").textContent = `Ready · ${workers} ${workers === 1 ? "worker" : "workers"}`;
      // A server that does not list its modes predates text queries.
      setTextMode(ready.modes ? ready.modes.text !== false : false, ready.modes !== undefined);
    } catch (error) {
      line.dataset.state = "down";
      $("readiness-text").textContent = `Not ready: ${error.message}`;
    }
  }

  function setTextMode(enabled, known) {
    const text = $("text");
    text.disabled = !enabled;
    text.placeholder = enabled ? "a red sneaker" : "Text search is not available";
    $("text-note").hidden = enabled;
    $("text-note").textContent = known
      ? "No ready worker can embed text right now."
      : "This server does not support text queries.";
  }

  async function loadGalleries() {
    let listing;
    try {
      listing = await getJson("/galleries");
    } catch {
      return; // no listing (older server, or not ready): the server's default gallery is used
    }
    const galleries = Array.isArray(listing?.galleries) ? listing.galleries : [];
    const select = $("gallery");
    select.replaceChildren(
      ...galleries.map((g) => {
        const option = new Option(`${g.name} (${formatCount(g.size)} images)`, g.name);
        option.selected = g.name === listing.default;
        return option;
      }),
    );
    $("gallery-field").hidden = galleries.length < 2;
  }

  // ---- wiring ----------------------------------------------------------------------------

  function wire() {
    $("search").addEventListener("submit", onSubmit);
    $("file").addEventListener("change", (event) => {
      startImage(event.target.files[0]);
      event.target.value = ""; // choosing the same file again still fires "change"
    });
    $("key").value = state.key;
    $("key-field").hidden = !state.key;
    $("key").addEventListener("change", (event) => {
      state.key = event.target.value.trim();
      sessionStorage.setItem(KEY_STORE, state.key);
      loadGalleries();
    });

    // Drop anywhere on the page; the drop zone lights up while something is dragged over it.
    let depth = 0;
    const drop = $("drop");
    document.addEventListener("dragenter", (event) => {
      event.preventDefault();
      depth += 1;
      drop.classList.add("dragging");
    });
    document.addEventListener("dragleave", () => {
      depth = Math.max(0, depth - 1);
      if (!depth) drop.classList.remove("dragging");
    });
    document.addEventListener("dragover", (event) => event.preventDefault());
    document.addEventListener("drop", (event) => {
      event.preventDefault();
      depth = 0;
      drop.classList.remove("dragging");
      startImage(event.dataTransfer?.files[0]);
    });
    // Ctrl+V with an image on the clipboard; pasting text into a field stays as it is.
    document.addEventListener("paste", (event) => {
      const file = event.clipboardData?.files[0];
      if (!file) return;
      event.preventDefault();
      startImage(file);
    });

    checkReady();
    loadGalleries();
    setInterval(() => {
      if (document.visibilityState === "visible") checkReady();
    }, READY_EVERY_MS);
  }

  wire();
})();
