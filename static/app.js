// The upload page's behaviour. Progressive enhancement: without this file the form posts to the server,
// which renders the result page itself. Everything that comes from the server or the model (labels,
// names, messages) is inserted with textContent, never innerHTML.
"use strict";

(() => {
  const form = document.getElementById("classify-form");
  if (!form) return;
  document.documentElement.classList.add("js");
  form.noValidate = true; // the checks below give better messages than the browser's bubbles

  const $ = (id) => document.getElementById(id);
  const input = $("file");
  const dropzone = $("dropzone");
  const previews = $("previews");
  const button = $("submit");
  const spinner = $("spinner");
  const buttonLabel = $("submit-label");
  const status = $("status");
  const formError = $("form-error");
  const results = $("results");
  const cards = $("cards");
  const modelSelect = $("model");
  const topK = $("top_k");
  const apiKey = $("api_key");

  const maxBytes = Number(form.dataset.maxBytes);
  const maxFiles = Number(form.dataset.maxFiles);
  const messages = JSON.parse(form.dataset.messages);
  const PART_OVERHEAD = 1024; // multipart headers of one file, plus the model and top_k fields
  // The short side (pixels) each model's photos are cut to before they travel: twice the model's input,
  // from its preprocessing on the server. A photo with fewer pixels, or a file this small, goes as it is.
  const uploadSides = JSON.parse(form.dataset.uploadSides || "{}");
  const defaultUploadSide = Number(form.dataset.uploadSide) || 0;
  // POST /explain, when the server explains: each result card then offers "Why?" (a Grad-CAM heat map)
  const explainUrl = form.dataset.explainUrl || "";
  const SHRINK_ABOVE_BYTES = 300 * 1024;
  const JPEG_QUALITY = 0.9;

  let chosen = []; // [{file, url}] in the order they were added
  let cardUrls = []; // object URLs of the thumbnails in the result cards
  let busy = false;
  let explanations = 0; // a unique id for each card's explanation

  // --- small helpers

  function message(code, values = {}, fallback = "") {
    let text = messages[code] || fallback || messages.unexpected;
    for (const [name, value] of Object.entries(values)) text = text.replaceAll(`{${name}}`, String(value));
    return text;
  }

  function formatBytes(n) {
    if (n < 1024) return `${n} bytes`;
    if (n < 1024 * 1024) return `${Number((n / 1024).toPrecision(3))} KB`;
    return `${Number((n / (1024 * 1024)).toPrecision(3))} MB`;
  }

  const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
  const displayName = (file) => file.name || "pasted image";
  const slot = (root, name) => root.querySelector(`[data-slot="${name}"]`);
  const fill = (root, name, text) => {
    slot(root, name).textContent = text;
  };
  const clone = (id) => $(id).content.firstElementChild.cloneNode(true);

  function showFormError(text) {
    formError.textContent = text;
    formError.hidden = false;
  }

  // --- choosing photos: file chooser, drag and drop, paste

  function addFiles(files, replace) {
    const list = Array.from(files || []);
    if (!list.length) return;
    if (replace) {
      for (const c of chosen) URL.revokeObjectURL(c.url);
      chosen = [];
    }
    for (const file of list) chosen.push({ file, url: URL.createObjectURL(file) });
    sync();
  }

  function removeAt(index) {
    URL.revokeObjectURL(chosen[index].url);
    chosen.splice(index, 1);
    sync();
    const buttons = previews.querySelectorAll('[data-slot="remove"]');
    (buttons[Math.min(index, buttons.length - 1)] || input).focus();
  }

  // The file input mirrors the chosen photos, so the form is right even if posted without this script.
  function sync() {
    try {
      const dt = new DataTransfer();
      for (const c of chosen) dt.items.add(c.file);
      input.files = dt.files;
    } catch {
      // an old browser without a DataTransfer constructor: the previews still show the choice
    }
    previews.replaceChildren(...chosen.map(preview));
    previews.hidden = chosen.length === 0;
    formError.hidden = true;
    status.textContent = chosen.length ? `${plural(chosen.length, "photo")} ready to classify.` : "";
  }

  function preview(c, index) {
    const item = clone("preview-template");
    const img = slot(item, "thumb");
    img.addEventListener("error", () => (img.hidden = true), { once: true }); // not an image: the file icon shows
    img.src = c.url;
    fill(item, "name", displayName(c.file));
    const remove = slot(item, "remove");
    remove.setAttribute("aria-label", `Remove ${displayName(c.file)}`);
    remove.addEventListener("click", () => removeAt(index));
    return item;
  }

  input.addEventListener("change", () => addFiles(input.files, true));

  const hasFiles = (event) => Array.from(event.dataTransfer?.types || []).includes("Files");
  let dragDepth = 0;
  document.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    dragDepth += 1;
    dropzone.dataset.dragging = "";
  });
  document.addEventListener("dragover", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault(); // a photo dropped anywhere on the page is taken, not opened by the browser
    event.dataTransfer.dropEffect = "copy";
  });
  document.addEventListener("dragleave", (event) => {
    if (!hasFiles(event)) return;
    dragDepth = Math.max(0, dragDepth - 1);
    if (dragDepth === 0) delete dropzone.dataset.dragging;
  });
  document.addEventListener("drop", (event) => {
    if (!event.dataTransfer || !event.dataTransfer.files.length) return;
    event.preventDefault();
    dragDepth = 0;
    delete dropzone.dataset.dragging;
    addFiles(event.dataTransfer.files, false);
  });

  document.addEventListener("paste", (event) => {
    const files = Array.from(event.clipboardData?.files || []).filter((f) => f.type.startsWith("image/"));
    if (!files.length) return; // text pasted into a field stays text
    event.preventDefault();
    addFiles(files, false);
  });

  // --- classifying

  function setBusy(on) {
    busy = on;
    const hadFocus = document.activeElement === button;
    button.disabled = on;
    button.setAttribute("aria-busy", String(on));
    spinner.hidden = !on;
    buttonLabel.textContent = on ? "Classifying…" : "Classify";
    results.setAttribute("aria-busy", String(on));
    if (!on && hadFocus) button.focus();
  }

  function newCard(c) {
    const card = clone("card-template");
    fill(card, "name", displayName(c.file));
    fill(card, "meta", "Classifying…");
    const url = URL.createObjectURL(c.file);
    cardUrls.push(url);
    const thumb = slot(card, "thumb");
    thumb.addEventListener("error", () => (thumb.hidden = true), { once: true });
    thumb.src = url;
    thumb.hidden = false;
    slot(card, "pending").hidden = false;
    return card;
  }

  function showCardError(card, text) {
    slot(card, "pending").hidden = true;
    fill(card, "meta", "Not classified");
    fill(card, "error", text);
    slot(card, "error").hidden = false;
  }

  function showPredictions(card, predictions, model, timeMs) {
    const rows = predictions.map((p) => {
      const row = clone("row-template");
      fill(row, "label", p.label);
      fill(row, "percent", `${(p.score * 100).toFixed(1)}%`);
      slot(row, "bar").value = Math.round(p.score * 1000) / 10;
      return row;
    });
    const list = slot(card, "predictions");
    list.replaceChildren(...rows);
    list.hidden = false;
    slot(card, "pending").hidden = true;
    fill(card, "meta", `${model} · ${Math.round(timeMs)} ms`);
  }

  // --- "Why?": the photo as the model saw it, with a heat map of where it found its top class

  // The same file (as it was sent, perhaps made small) and model as the classification: the heat map is
  // of the answer shown on the card.
  function offerWhy(card, upload, model) {
    if (!explainUrl) return;
    const why = slot(card, "why");
    const figure = slot(card, "explanation");
    explanations += 1;
    figure.id = `explanation-${explanations}`;
    why.setAttribute("aria-controls", figure.id);
    fill(card, "why-context", ` Show where the model looked in ${slot(card, "name").textContent}`);
    why.hidden = false;
    why.addEventListener("click", () => toggleWhy(card, upload, model));
  }

  async function toggleWhy(card, upload, model) {
    const why = slot(card, "why");
    const figure = slot(card, "explanation");
    if (why.getAttribute("aria-busy") === "true") return;
    const open = why.getAttribute("aria-expanded") !== "true";
    why.setAttribute("aria-expanded", String(open));
    figure.hidden = !open;
    if (!open || slot(card, "overlay").dataset.loaded) return;
    why.setAttribute("aria-busy", "true");
    fill(card, "caption", "Looking at where the model found its answer…");
    try {
      fill(card, "caption", await explain(card, upload, model));
    } finally {
      why.removeAttribute("aria-busy");
    }
  }

  // Returns the caption: what the picture shows, or why there is none.
  async function explain(card, upload, model) {
    const body = new FormData();
    body.append("file", upload, upload.name || "pasted-image.png");
    body.append("model", model);
    body.append("top_k", "1");
    const headers = apiKey ? { Authorization: `Bearer ${apiKey.value}` } : {};
    let response;
    try {
      response = await fetch(explainUrl, { method: "POST", body, headers });
    } catch {
      return message("network");
    }
    let data = null;
    try {
      data = await response.json();
    } catch {
      data = null;
    }
    if (!response.ok || !data || data.error || !data.overlay_png) return errorText(data && data.error, response.status);
    const label = data.explained.label;
    const img = slot(card, "overlay");
    img.alt = `The photo as the model saw it, under a heat map: warm colours mark where it found “${label}”.`;
    img.src = `data:image/png;base64,${data.overlay_png}`;
    img.hidden = false;
    img.dataset.loaded = "true";
    return `Where the model looked for “${label}”: red most, blue least (Grad-CAM).`;
  }

  // --- making large photos small before they travel

  function uploadSide() {
    return (modelSelect && uploadSides[modelSelect.value]) || defaultUploadSide;
  }

  function renamed(name, extension) {
    return name ? name.replace(/\.[^./\\]*$/, "") + extension : `pasted-image${extension}`;
  }

  async function encodeJpeg(canvas) {
    if (canvas.convertToBlob) return canvas.convertToBlob({ type: "image/jpeg", quality: JPEG_QUALITY });
    return new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", JPEG_QUALITY));
  }

  // The model sees a few hundred pixels, a phone photo has millions: it is drawn here at `side` pixels on
  // its short side and sent as a small JPEG (less to send on a slow link, and under the server's byte
  // limit). EXIF orientation is applied while decoding (the JPEG carries none); transparency goes over
  // white, as the server composites it. Anything this browser cannot do (a TIFF it cannot decode, no
  // canvas, no memory) sends the original file: the server decides about it, as it did before.
  async function shrink(file, side) {
    if (!side || file.size <= SHRINK_ABOVE_BYTES || typeof createImageBitmap !== "function") return file;
    let bitmap = null;
    try {
      bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
      const scale = side / Math.min(bitmap.width, bitmap.height);
      if (scale >= 1) return file; // never made larger
      const width = Math.max(1, Math.round(bitmap.width * scale));
      const height = Math.max(1, Math.round(bitmap.height * scale));
      const canvas =
        typeof OffscreenCanvas === "function"
          ? new OffscreenCanvas(width, height)
          : Object.assign(document.createElement("canvas"), { width, height });
      const context = canvas.getContext("2d");
      context.fillStyle = "#fff";
      context.fillRect(0, 0, width, height);
      context.imageSmoothingEnabled = true;
      context.imageSmoothingQuality = "high";
      context.drawImage(bitmap, 0, 0, width, height);
      const blob = await encodeJpeg(canvas);
      if (!blob || blob.type !== "image/jpeg" || blob.size >= file.size) return file;
      return new File([blob], renamed(file.name, ".jpg"), { type: "image/jpeg", lastModified: file.lastModified });
    } catch {
      return file;
    } finally {
      if (bitmap) bitmap.close();
    }
  }

  // Several photos go in as few requests as the server's limits (bytes and files per request) allow.
  function batches(jobs) {
    const out = [];
    let current = [];
    let bytes = 0;
    for (const job of jobs) {
      const size = job.upload.size + PART_OVERHEAD;
      if (current.length && (bytes + size > maxBytes || current.length >= maxFiles)) {
        out.push(current);
        current = [];
        bytes = 0;
      }
      current.push(job);
      bytes += size;
    }
    if (current.length) out.push(current);
    return out;
  }

  function errorText(error, httpStatus) {
    if (!error) return message("unexpected", { status: httpStatus });
    return message(error.code, { request_id: error.request_id || "-", status: httpStatus }, error.message);
  }

  // Returns how many photos of the batch could not be classified.
  async function send(batch) {
    const body = new FormData();
    for (const job of batch) body.append("file", job.upload, job.upload.name || "pasted-image.png");
    body.append("top_k", topK.value);
    if (modelSelect) body.append("model", modelSelect.value);
    const headers = apiKey ? { Authorization: `Bearer ${apiKey.value}` } : {};
    let response;
    try {
      response = await fetch(form.dataset.predictUrl, { method: "POST", body, headers });
    } catch {
      for (const job of batch) showCardError(job.card, message("network"));
      return batch.length;
    }
    let data = null;
    try {
      data = await response.json();
    } catch {
      data = null;
    }
    if (!response.ok || !data || data.error) {
      const text = errorText(data && data.error, response.status);
      for (const job of batch) showCardError(job.card, text);
      return batch.length;
    }
    const entries = data.results || [{ predictions: data.predictions }];
    let failed = 0;
    batch.forEach((job, i) => {
      const entry = entries[i];
      if (entry && entry.predictions) {
        showPredictions(job.card, entry.predictions, data.model, data.time_ms);
        offerWhy(job.card, job.upload, data.model);
      } else {
        failed += 1;
        showCardError(job.card, errorText(entry && entry.error, (entry && entry.status) || response.status));
      }
    });
    return failed;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (busy) return;
    if (!chosen.length) {
      showFormError(message("no_file"));
      input.focus();
      return;
    }
    if (apiKey && !apiKey.value) {
      showFormError(message("unauthorized"));
      apiKey.focus();
      return;
    }
    formError.hidden = true;
    setBusy(true);
    status.textContent = `Classifying ${plural(chosen.length, "photo")}…`;
    const started = performance.now();

    for (const url of cardUrls) URL.revokeObjectURL(url);
    cardUrls = [];
    const jobs = chosen.map((c) => ({ c, card: newCard(c) }));
    cards.replaceChildren(...jobs.map((job) => job.card));
    results.hidden = false;

    let failed = 0;
    try {
      const sendable = [];
      const side = uploadSide();
      for (const job of jobs) {
        job.upload = await shrink(job.c.file, side); // one at a time: a decoded 12 MP photo is 48 MB
        if (job.upload.size + PART_OVERHEAD > maxBytes) {
          // checked here, on what would be sent, against the server's limit: a too-large file never travels
          showCardError(job.card, message("file_too_large", { size: formatBytes(job.upload.size) }));
          failed += 1;
        } else {
          sendable.push(job);
        }
      }
      for (const batch of batches(sendable)) failed += await send(batch);
    } finally {
      setBusy(false);
    }
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    status.textContent =
      failed === 0
        ? `Classified ${plural(jobs.length, "photo")} in ${seconds} s.`
        : `${failed} of ${plural(jobs.length, "photo")} could not be classified.`;
  });
})();
