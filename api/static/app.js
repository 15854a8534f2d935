// lookalike's page: a plain client of the public HTTP API (POST /jobs, job events, long poll,
// the galleries and their items).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const FINAL = new Set(["succeeded", "failed"]);
  const THUMB_CSS_PX = 128; // keep in step with --thumb in app.css
  const POLL_WAIT_S = 25;
  const READY_EVERY_MS = 15000;
  const UNREACHABLE = "The service cannot be reached; check that it runs and retry.";
  const KEY_STORE = "lookalike-api-key";
  const PAGE_ITEMS = 24; // items per page of the gallery view
  const ADDS_AT_ONCE = 2; // each add holds a connection while it is followed; browsers have 6
  const LIVE = "live";
  const GALLERY_NAME = /^[a-z0-9][a-z0-9._-]{0,63}$/; // shared/settings.py GALLERY_NAME
  const BAD_NAME = "The gallery name must be lower-case letters, digits, '.', '_' and '-' (up to 64).";

  const state = {
    run: 0, // bumped by every new query: older ones stop updating the page
    query: null, // the last image or item query, so "Search" can send it again with new options
    queryUrl: null, // object URL of that image
    gridUrl: null,
    stopStream: null, // closes the search's open EventSource, if any
    step: "upload", // the step shown as current
    key: sessionStorage.getItem(KEY_STORE) || "",
    galleries: new Map(), // name -> summary, from GET /galleries
  };

  // The gallery view: which gallery, which page (cursors[i] is the `after` of page i).
  const browse = { name: "", live: false, cursors: [null], page: 0, load: 0, refresh: 0 };
  const adds = { queue: [], running: 0 };

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

  // The reply's status and JSON body (null when it has none); an ApiError unless it is 2xx.
  async function send(method, path) {
    let reply;
    try {
      reply = await fetch(path, { method, headers: { Accept: "application/json", ...authHeaders() } });
    } catch {
      throw new ApiError(UNREACHABLE, 0);
    }
    const body = await reply.json().catch(() => null);
    if (!reply.ok) throw apiError(reply.status, body, reply.headers.get("Retry-After"));
    return { status: reply.status, body };
  }

  const getJson = async (path) => (await send("GET", path)).body;

  // XMLHttpRequest rather than fetch: it reports upload progress.
  function sendForm(method, path, form, onProgress) {
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open(method, path);
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

  const postJob = (form, onProgress) => sendForm("POST", "/jobs", form, onProgress);

  // Following a job: `follow` says whether it still matters (alive), what to do with each
  // state of it (onJob) and with a transient failure (onRetry); `follow.stop()` ends a stream.

  // Server-Sent Events first; null when the stream breaks before the end (or is missing).
  function streamJob(id, follow) {
    if (!window.EventSource || state.key) return Promise.resolve(null); // EventSource has no headers
    return new Promise((resolve) => {
      const source = new EventSource(`/jobs/${encodeURIComponent(id)}/events`);
      const finish = (job) => {
        source.close();
        follow.stop = null;
        resolve(job);
      };
      follow.stop = () => finish(null);
      source.addEventListener("job", (event) => {
        if (!follow.alive()) return finish(null);
        let job;
        try {
          job = JSON.parse(event.data);
        } catch {
          return finish(null);
        }
        follow.onJob(job);
        if (FINAL.has(job.status)) finish(job);
      });
      source.onerror = () => finish(null);
    });
  }

  async function pollJob(id, follow) {
    for (let failures = 0; follow.alive(); ) {
      try {
        const job = await getJson(`/jobs/${encodeURIComponent(id)}?wait=${POLL_WAIT_S}`);
        if (!follow.alive()) break;
        failures = 0;
        follow.onJob(job);
        if (FINAL.has(job.status)) return job;
      } catch (error) {
        const transient = error.status === 0 || error.status === 429 || error.status >= 500;
        if (!transient || ++failures > 5) throw error;
        follow.onRetry(`${error.message} Trying again…`);
        await new Promise((wake) => setTimeout(wake, 1000 * failures));
      }
    }
    return null;
  }

  // The job as it ended (null if it stopped mattering): over the event stream, long polling
  // when the stream is missing or breaks.
  async function followJob(created, follow) {
    follow.onJob(created);
    if (FINAL.has(created.status)) return created;
    return (await streamJob(created.id, follow)) || (await pollJob(created.id, follow));
  }

  // ---- a query from start to end ---------------------------------------------------------

  // A query is {file}, {text} or {item: {id, gallery, imageUrl}} ("more like this").
  async function search(query) {
    const run = ++state.run;
    state.stopStream?.();
    const form = new FormData();
    if (query.file) form.append("file", query.file, query.file.name || "pasted.png");
    else if (query.item) form.append("item", query.item.id);
    else form.append("text", query.text);
    const k = $("k").value.trim();
    if (k) form.append("k", k);
    // An item is searched for in its own gallery, whatever the selector says now.
    const gallery = query.item ? query.item.gallery : !$("gallery-field").hidden && $("gallery").value;
    if (gallery) form.append("gallery", gallery);
    // Sent as typed: the API checks them and says what is wrong.
    const filter = $("filter").value.trim();
    if (filter) form.append("filter", filter);
    const minScore = $("min-score").value.trim();
    if (minScore) form.append("min_score", minScore);

    resetResults(query);
    try {
      const created = await postJob(form, (share) => {
        if (run === state.run) showUpload(share);
      });
      if (run !== state.run) return;
      $("upload").hidden = true;
      const follow = {
        alive: () => run === state.run,
        onJob: showJob,
        onRetry: (message) => ($("progress-text").textContent = message),
      };
      state.stopStream = () => follow.stop?.();
      await followJob(created, follow);
    } catch (error) {
      if (run !== state.run) return;
      showError(error.message);
      markRefused(error);
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
    state.query = { file };
    $("text").value = "";
    search(state.query);
  }

  // "More like this": the item's gallery searched with the item's own embedding.
  function moreLike(item) {
    state.query = { item };
    $("text").value = "";
    search(state.query);
    $("results").scrollIntoView({ block: "start" });
    $("results-title").focus({ preventScroll: true });
  }

  function onSubmit(event) {
    event.preventDefault();
    const text = $("text").value.trim();
    if (text && !$("text").disabled) search({ text });
    else if (state.query) search(state.query);
    else showError("Choose an image or type a text query first.");
  }

  // ---- showing it ------------------------------------------------------------------------

  function showError(message) {
    $("error").textContent = message;
    $("error").hidden = !message;
  }

  // The API's 422 sentences start with the field they refuse.
  const FIELDS = { filter: "filter", min_score: "min-score", k: "k" };

  function markRefused(error) {
    const field = error.status === 422 ? FIELDS[error.message.split(" ")[0]] : undefined;
    if (!field) return;
    $(field).setAttribute("aria-invalid", "true");
    $(field).setAttribute("aria-errormessage", "error");
  }

  function resetResults(query) {
    showError("");
    for (const field of Object.values(FIELDS)) {
      $(field).removeAttribute("aria-invalid");
      $(field).removeAttribute("aria-errormessage");
    }
    $("go").disabled = true;
    $("results").hidden = false;
    $("results").dataset.status = "uploading";
    $("matches").replaceChildren();
    $("meta-text").textContent = "";
    $("grid-link").hidden = true;
    $("random-warning").hidden = true;
    $("upload").value = 0;
    $("upload").hidden = !query.file;
    $("query-caption").textContent = query.item ? `More like item ${query.item.id}` : "Your query";
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
    } else if (query.item) {
      const img = new Image();
      img.alt = `Item ${query.item.id} of ${query.item.gallery}`;
      img.onload = () => img.classList.toggle("pixelated", img.naturalWidth <= 96);
      img.onerror = () => view.replaceChildren(placeholder(`Item ${query.item.id}`));
      view.replaceChildren(img);
      if (query.item.imageUrl) showImage(img, sizedUrl(query.item.imageUrl, THUMB_CSS_PX * 1.5));
      else img.onerror();
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
    const name = match.label_name || (match.label != null ? `class ${match.label}` : match.item_id);
    img.alt = `Rank ${match.rank}: ${name}, score ${formatScore(match.score)}`;
    img.decoding = "async";
    img.onerror = () => frame.replaceChildren(placeholder(name));
    showImage(img, thumbUrl(match, gallery));
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
    if (match.item_id !== undefined && match.item_id !== null) {
      item.dataset.itemId = match.item_id;
      // A built gallery's label is the class: its id goes under it. A live one's is the id.
      const shown = { ...(match.attributes || {}) };
      if (match.label_name) delete shown.class;
      item.append(itemLine(match.label_name ? match.item_id : null, shown));
      item.append(moreButton({ id: match.item_id, gallery, imageUrl: match.image_url || thumbUrl(match, gallery) }));
    }
    return item;
  }

  // "Item <id>" (when given) over "name: value · ..." (when there are attributes).
  function itemLine(id, attributes) {
    const line = document.createElement("p");
    line.className = "item-line";
    if (id !== null) {
      const code = document.createElement("code");
      code.className = "item-id";
      code.textContent = id;
      line.append("Item ", code);
    }
    const pairs = Object.entries(attributes || {});
    if (pairs.length) {
      const list = document.createElement("span");
      list.className = "attrs";
      list.textContent = pairs.map(([name, value]) => `${name}: ${formatValue(value)}`).join(" · ");
      if (id !== null) line.append(document.createElement("br"));
      line.append(list);
    }
    return line;
  }

  function moreButton(item) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "small more";
    button.textContent = "More like this";
    button.setAttribute("aria-label", `More like item ${item.id}`);
    button.addEventListener("click", () => moreLike(item));
    return button;
  }

  function thumbUrl(match, gallery) {
    const base = match.image_url || `/gallery/${match.index}.png?gallery=${encodeURIComponent(gallery)}`;
    return sizedUrl(base, THUMB_CSS_PX);
  }

  function sizedUrl(base, cssPx) {
    const url = new URL(base, location.href);
    const px = Math.round(cssPx * (window.devicePixelRatio || 1));
    url.searchParams.set("size", String(Math.max(16, Math.min(512, px))));
    return url.pathname + url.search;
  }

  // A live gallery's images need the API key, which an <img> cannot send: with a key they are
  // fetched and shown from an object URL. Built galleries' images are public.
  async function showImage(img, url) {
    if (!state.key || !url.startsWith("/galleries/")) {
      img.src = url;
      return;
    }
    try {
      const reply = await fetch(url, { headers: authHeaders() });
      if (!reply.ok) throw new ApiError(`status ${reply.status}`, reply.status);
      const objectUrl = URL.createObjectURL(await reply.blob());
      img.addEventListener("load", () => URL.revokeObjectURL(objectUrl), { once: true });
      img.src = objectUrl;
    } catch {
      img.onerror?.();
    }
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

  const formatValue = (value) => (typeof value === "string" ? value : JSON.stringify(value));
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

  // Both selectors, keeping each one's choice; the gallery view opens `open` if given.
  async function loadGalleries(open) {
    let listing;
    try {
      listing = await getJson("/galleries");
    } catch {
      return; // no listing (older server, or not ready): the server's default gallery is used
    }
    const galleries = Array.isArray(listing?.galleries) ? listing.galleries : [];
    state.galleries = new Map(galleries.map((g) => [g.name, g]));
    fillSelect($("gallery"), galleries, $("gallery").value || listing.default);
    $("gallery-field").hidden = galleries.length < 2;
    showClasses();
    fillSelect($("browse-gallery"), galleries, open || browse.name || listing.default);
    $("browse").hidden = galleries.length === 0;
    const shown = $("browse-gallery").value;
    if (shown && shown !== browse.name) openGallery(shown);
    else showGalleryKind();
  }

  function fillSelect(select, galleries, wanted) {
    select.replaceChildren(
      ...galleries.map((g) => {
        const live = g.kind === LIVE ? ", live" : "";
        return new Option(`${g.name} (${formatCount(g.size)} ${g.size === 1 ? "image" : "images"}${live})`, g.name);
      }),
    );
    const names = galleries.map((g) => g.name);
    select.value = names.includes(wanted) ? wanted : names[0] || "";
  }

  // The search gallery's classes, as a hint for the filter field.
  function showClasses() {
    const classes = state.galleries.get($("gallery").value)?.classes || [];
    $("filter-classes").textContent = classes.length
      ? ` Its classes: ${classes.map((c) => JSON.stringify(c)).join(", ")}, e.g. {"class": ${JSON.stringify(classes[0])}}.`
      : "";
  }

  // ---- the gallery view: its items a page at a time; adds and deletes in live ones -------

  function openGallery(name) {
    browse.name = name;
    browse.live = state.galleries.get(name)?.kind === LIVE;
    browse.cursors = [null];
    browse.page = 0;
    $("add-zone").hidden = !browse.live;
    $("items").replaceChildren();
    showBrowseError("");
    showGalleryKind();
    loadItems();
  }

  function showGalleryKind() {
    const g = state.galleries.get(browse.name);
    if (!g) return;
    const size = `${formatCount(g.size)} ${g.size === 1 ? "item" : "items"}`;
    const changed = g.updated_at ? `, changed ${new Date(g.updated_at).toLocaleString()}` : "";
    $("browse-kind").textContent = g.kind === LIVE
      ? `Live gallery · ${size}${changed}. Add images below; delete any item.`
      : `Built from files (${g.kind || "built"}), read-only · ${size}.`;
  }

  async function loadItems() {
    const load = ++browse.load;
    const name = browse.name;
    const params = new URLSearchParams({ limit: String(PAGE_ITEMS) });
    const after = browse.cursors[browse.page];
    if (after !== null && after !== undefined) params.set("after", after);
    $("items").setAttribute("aria-busy", "true");
    let page;
    try {
      page = await getJson(`/galleries/${encodeURIComponent(name)}/items?${params}`);
    } catch (error) {
      if (load !== browse.load) return;
      $("items").removeAttribute("aria-busy");
      showBrowseError(error.message);
      return;
    }
    if (load !== browse.load) return;
    const items = Array.isArray(page?.items) ? page.items : [];
    if (!items.length && browse.page > 0) {
      browse.page -= 1; // its last items were deleted
      return loadItems();
    }
    browse.cursors.length = browse.page + 1;
    browse.cursors.push(page.next ?? null);
    $("items").replaceChildren(...items.map(itemCard));
    $("items").removeAttribute("aria-busy");
    const first = browse.page * PAGE_ITEMS + 1;
    $("page-text").textContent = items.length
      ? `Page ${browse.page + 1} · items ${formatCount(first)}–${formatCount(first + items.length - 1)} of ${formatCount(page.total)}`
      : browse.live ? "No items yet: add some images." : "No items.";
    $("prev-page").disabled = browse.page === 0;
    $("next-page").disabled = page.next === null || page.next === undefined;
  }

  // Only to a page whose cursor is known (a second click while a page loads does nothing).
  function turnPage(step) {
    const page = browse.page + step;
    if (page < 0 || (page > 0 && (browse.cursors[page] ?? null) === null)) return;
    browse.page = page;
    loadItems().then(() => $("items").firstElementChild?.querySelector("button")?.focus());
  }

  function itemCard(item) {
    const card = document.createElement("li");
    card.className = "match item";
    card.dataset.id = item.id;
    card.dataset.state = item.state;
    const figure = document.createElement("figure");
    const frame = document.createElement("div");
    frame.className = "thumb";
    if (item.image_url) {
      const img = new Image(THUMB_CSS_PX, THUMB_CSS_PX);
      img.alt = `Item ${item.id}`;
      img.decoding = "async";
      img.loading = "lazy";
      img.onerror = () => frame.replaceChildren(placeholder(`Item ${item.id}`));
      showImage(img, sizedUrl(item.image_url, THUMB_CSS_PX));
      frame.append(img);
    } else {
      frame.append(placeholder(item.state === "pending" ? "Being added…" : `Item ${item.id}`));
    }
    figure.append(frame);
    card.append(figure, itemLine(item.id, item.attributes));
    const actions = document.createElement("div");
    actions.className = "item-actions";
    if (item.state === "indexed") {
      actions.append(moreButton({ id: item.id, gallery: browse.name, imageUrl: item.image_url }));
    }
    if (browse.live) {
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "small danger delete";
      remove.textContent = "Delete";
      remove.setAttribute("aria-label", `Delete item ${item.id}`);
      remove.addEventListener("click", () => deleteItem(item.id, remove));
      actions.append(remove);
    }
    card.append(actions);
    return card;
  }

  async function deleteItem(id, button) {
    const name = browse.name;
    button.disabled = true;
    showBrowseError("");
    try {
      await send("DELETE", `/galleries/${encodeURIComponent(name)}/items/${encodeURIComponent(id)}`);
    } catch (error) {
      button.disabled = false;
      showBrowseError(error.message);
      return;
    }
    // Focus moves to the next item's delete button (or the heading), not to the page's top.
    const card = button.closest("li");
    const next = card?.nextElementSibling?.dataset.id ?? card?.previousElementSibling?.dataset.id;
    say(`Deleted item ${id}.`);
    if (name !== browse.name) return;
    await loadItems();
    const target = [...$("items").children].find((li) => li.dataset.id === next);
    (target?.querySelector(".delete") || $("browse-title")).focus({ preventScroll: !!target });
    loadGalleries();
  }

  async function createGallery(event) {
    event.preventDefault();
    const name = $("new-gallery").value.trim();
    showBrowseError("");
    if (!GALLERY_NAME.test(name)) {
      showBrowseError(name ? BAD_NAME : "Type a name for the new gallery first.");
      $("new-gallery").focus();
      return;
    }
    $("create").disabled = true;
    try {
      const { status } = await send("PUT", `/galleries/${encodeURIComponent(name)}`);
      $("new-gallery").value = "";
      await loadGalleries(name);
      say(status === 201 ? `Created the live gallery ${name}.` : `The live gallery ${name} exists already; it is shown.`);
    } catch (error) {
      showBrowseError(error.message);
    } finally {
      $("create").disabled = false;
    }
  }

  // ---- adding images to a live gallery ---------------------------------------------------

  // An item id from a file name: its stem, with what ids may not hold replaced by "_".
  function itemIdOf(fileName, taken) {
    const stem = (fileName || "").replace(/\.[^.]*$/, "") || fileName || "image";
    const base = stem.replace(/[^A-Za-z0-9_.:-]/g, "_").slice(0, 120) || "image";
    let id = base;
    for (let n = 2; taken.has(id); n += 1) id = `${base}-${n}`; // two files of one drop
    taken.add(id);
    return id;
  }

  function addFiles(files) {
    if (!browse.live || !files.length) return;
    showBrowseError("");
    const attributes = $("add-attributes").value.trim();
    const taken = new Set();
    for (const file of files) {
      const add = { file, gallery: browse.name, id: itemIdOf(file.name, taken), attributes };
      add.entry = addEntry(add);
      adds.queue.push(add);
    }
    say(`Adding ${files.length} ${files.length === 1 ? "image" : "images"} to ${browse.name}…`);
    pumpAdds();
  }

  // A few adds at a time: each holds a connection while its job is followed.
  function pumpAdds() {
    while (adds.running < ADDS_AT_ONCE && adds.queue.length) {
      const add = adds.queue.shift();
      adds.running += 1;
      runAdd(add).finally(() => {
        adds.running -= 1;
        pumpAdds();
      });
    }
  }

  async function runAdd(add) {
    const form = new FormData();
    form.append("file", add.file, add.file.name || "image.png");
    if (add.attributes) form.append("attributes", add.attributes);
    const path = `/galleries/${encodeURIComponent(add.gallery)}/items/${encodeURIComponent(add.id)}`;
    try {
      const created = await sendForm("PUT", path, form, (share) => showAdd(add, { status: "uploading", share }));
      const follow = {
        alive: () => true,
        onJob: (job) => showAdd(add, job),
        onRetry: (message) => showAdd(add, { status: "retrying", message }),
      };
      const job = await followJob(created, follow);
      if (job?.status === "succeeded") itemsChanged(add.gallery);
    } catch (error) {
      showAdd(add, { status: "failed", error: error.message });
    }
  }

  function addEntry(add) {
    const entry = document.createElement("li");
    entry.className = "add";
    const name = document.createElement("code");
    name.textContent = add.id;
    const text = document.createElement("span");
    text.className = "add-text";
    const bar = document.createElement("progress");
    bar.max = 100;
    bar.setAttribute("aria-label", `Adding ${add.id}`);
    entry.append(name, text, bar);
    $("adds").prepend(entry);
    $("adds-box").hidden = false;
    while ($("adds").children.length > 50) $("adds").lastElementChild.remove();
    showAdd({ ...add, entry }, { status: "waiting" });
    return entry;
  }

  const ADD_DONE = {
    indexed: "Added",
    deleted: "Not added: the item was deleted meanwhile",
    superseded: "Not added: a newer image of this item came first",
  };

  function showAdd(add, job) {
    const { entry } = add;
    const bar = entry.querySelector("progress");
    let text;
    let value = null;
    if (job.status === "waiting") text = "Waiting…";
    else if (job.status === "uploading") {
      value = Math.round(job.share * 50);
      text = job.share < 1 ? `Uploading… ${Math.round(job.share * 100)}%` : "Checking the image…";
    } else if (job.status === "retrying") text = job.message;
    else if (job.status === "queued") [text, value] = ["Queued", 60];
    else if (job.status === "running") [text, value] = [job.stage ? `Running · ${job.stage}` : "Running", 80];
    else if (job.status === "succeeded") {
      const item = job.result?.item || {};
      text = ADD_DONE[item.state] || "Added";
      if (item.duplicate_of) text += ` (the same image as item ${item.duplicate_of})`;
      value = 100;
      say(`${text}: ${add.id}.`);
    } else if (job.status === "failed") {
      text = `Failed: ${job.error || "the job failed."}`;
      say(`${add.id}: ${text}`);
    }
    entry.dataset.state = job.status;
    entry.querySelector(".add-text").textContent = text;
    bar.hidden = FINAL.has(job.status);
    if (value === null) bar.removeAttribute("value");
    else bar.value = value;
  }

  // Several adds end close together: one reload of the page and of the sizes for them all.
  function itemsChanged(gallery) {
    clearTimeout(browse.refresh);
    browse.refresh = setTimeout(() => {
      if (gallery === browse.name) loadItems();
      loadGalleries();
    }, 200);
  }

  function say(message) {
    $("browse-status").textContent = message;
  }

  function showBrowseError(message) {
    $("browse-error").textContent = message;
    $("browse-error").hidden = !message;
  }

  // ---- wiring ----------------------------------------------------------------------------

  function wire() {
    $("search").addEventListener("submit", onSubmit);
    $("gallery").addEventListener("change", showClasses);
    $("browse-gallery").addEventListener("change", (event) => openGallery(event.target.value));
    $("create-gallery").addEventListener("submit", createGallery);
    $("prev-page").addEventListener("click", () => turnPage(-1));
    $("next-page").addEventListener("click", () => turnPage(1));
    $("clear-adds").addEventListener("click", () => {
      for (const entry of [...$("adds").children]) if (FINAL.has(entry.dataset.state)) entry.remove();
      $("adds-box").hidden = !$("adds").children.length;
      $("add-files").focus();
    });
    $("add-files").addEventListener("change", (event) => {
      addFiles([...event.target.files]);
      event.target.value = "";
    });
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

    // Drop anywhere on the page to search; onto a live gallery's drop zone to add. The zone
    // that takes the drop lights up while something is dragged.
    let depth = 0;
    const drop = $("drop");
    const addDrop = $("add-drop");
    const adding = (target) => target instanceof Element && !!target.closest("#add-drop");
    const light = (onAdd) => {
      drop.classList.toggle("dragging", onAdd === false);
      addDrop.classList.toggle("dragging", onAdd === true);
    };
    document.addEventListener("dragenter", (event) => {
      event.preventDefault();
      depth += 1;
      light(adding(event.target));
    });
    document.addEventListener("dragleave", () => {
      depth = Math.max(0, depth - 1);
      if (!depth) light(null);
    });
    document.addEventListener("dragover", (event) => {
      event.preventDefault();
      light(adding(event.target));
    });
    document.addEventListener("drop", (event) => {
      event.preventDefault();
      depth = 0;
      light(null);
      const files = [...(event.dataTransfer?.files || [])];
      if (adding(event.target)) addFiles(files);
      else startImage(files[0]);
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
