// The LightOnOCR web page: upload a document, stream its pages from /api/inference
// (NDJSON), and show each page's image (from /web/render) beside its rendered markdown.
// Plain browser JavaScript, no build step; markdown-it, KaTeX and DOMPurify are vendored.
(() => {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const KEY_STORAGE = "lightonocr.apiKey";

  // ---------------------------------------------------------------- markdown and math

  // Model output is untrusted: it may carry any HTML. It is rendered, then sanitized
  // with DOMPurify (no scripts, no event handlers, no javascript: URLs); ids and names
  // are dropped so output cannot shadow the page's own elements.
  const SANITIZE = {
    USE_PROFILES: { html: true, svg: true, mathMl: true },
    FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "iframe"],
    FORBID_ATTR: ["id", "name"],
  };

  const MATH_DELIMITERS = [
    ["$$", "$$", true],
    ["\\[", "\\]", true],
    ["\\(", "\\)", false],
  ];

  // Math starting at `pos` in `src`: {tex, display, end} or null.
  function findMath(src, pos) {
    for (const [open, close, display] of MATH_DELIMITERS) {
      if (src.startsWith(open, pos)) {
        const end = src.indexOf(close, pos + open.length);
        if (end <= pos + open.length) return null;
        return { tex: src.slice(pos + open.length, end), display, end: end + close.length };
      }
    }
    // Single dollars follow pandoc's rule so prices ("$5 and $10") stay text: no space
    // after the opening $, none before the closing one, and no digit right after it.
    if (src[pos] !== "$" || /\s/.test(src[pos + 1] || " ")) return null;
    for (let end = src.indexOf("$", pos + 1); end !== -1; end = src.indexOf("$", end + 1)) {
      if (/[\s\\]/.test(src[end - 1]) || /\d/.test(src[end + 1] || "")) continue;
      return { tex: src.slice(pos + 1, end), display: false, end: end + 1 };
    }
    return null;
  }

  function typeset(tex, display) {
    try {
      return window.katex.renderToString(tex, { displayMode: display, throwOnError: false });
    } catch {
      return escapeHtml(display ? `$$${tex}$$` : `$${tex}$`);
    }
  }

  // Math inside raw HTML blocks (LightOnOCR's tables) is typeset in the text between tags.
  function typesetHtml(html) {
    return html
      .split(/(<[^>]*>)/)
      .map((part, i) => (i % 2 ? part : typesetText(part)))
      .join("");
  }

  function typesetText(text) {
    let out = "";
    let last = 0;
    for (let pos = 0; pos < text.length; pos++) {
      if (text[pos] !== "$" && text[pos] !== "\\") continue;
      const found = findMath(text, pos);
      if (!found) {
        if (text[pos] === "\\") pos++; // an escaped character is never a delimiter
        continue;
      }
      out += text.slice(last, pos) + typeset(decodeEntities(found.tex), found.display);
      last = found.end;
      pos = found.end - 1;
    }
    return out + text.slice(last);
  }

  // A markdown-it rule that takes math before markdown sees it, so `_`, `*` and `\\`
  // inside formulas are not turned into emphasis or escapes.
  function mathPlugin(md) {
    md.inline.ruler.before("escape", "math", (state, silent) => {
      const found = findMath(state.src, state.pos);
      if (!found) return false;
      if (!silent) {
        const token = state.push("math", "", 0);
        token.content = found.tex;
        token.meta = { display: found.display };
      }
      state.pos = found.end;
      return true;
    });
    md.renderer.rules.math = (tokens, i) => typeset(tokens[i].content, tokens[i].meta.display);
    md.renderer.rules.html_block = (tokens, i) => typesetHtml(tokens[i].content);
  }

  const markdown = window.markdownit({ html: true, linkify: false, typographer: false }).use(mathPlugin);

  function renderMarkdown(text) {
    return window.DOMPurify.sanitize(markdown.render(text), SANITIZE);
  }

  // Grounding boxes, coloured by the model's label; a label the service does not know is grey.
  const LABEL_COLORS = {
    title: "#c62828", section: "#ef6c00", text: "#1565c0", list: "#00838f", caption: "#6a1b9a",
    footnote: "#8d6e63", aside_text: "#9e9d24", header: "#757575", footer: "#757575", page_number: "#757575",
    table: "#2e7d32", chart: "#ad1457", formula: "#d84315", code: "#283593", image: "#f9a825",
  };
  const HEADER_FOOTER = new Set(["header", "footer", "page_number", "footnote"]);

  function colorOf(label) {
    return LABEL_COLORS[label] || "#9e9e9e";
  }

  // A picture's markdown reference (`page_N_image_K.png`) shown as its crop, when the block carries one.
  function withPictures(text, blocks) {
    const crops = new Map(blocks.filter((b) => b.picture && b.image).map((b) => [b.picture, b.image]));
    return text.replace(/\]\(page_\d+_image_(\d+)\.png\)/g, (ref, k) => (crops.has(Number(k)) ? `](${crops.get(Number(k))})` : ref));
  }

  function escapeHtml(text) {
    const span = document.createElement("span");
    span.textContent = text;
    return span.innerHTML;
  }

  function decodeEntities(html) {
    const area = document.createElement("textarea"); // parses entities only, never markup
    area.innerHTML = html;
    return area.value;
  }

  // ---------------------------------------------------------------- state and layout

  let run = null; // the run on screen: {controller, pages, images, imageError, result, started}

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // Service messages mark names with backticks (`pages`, MAX_PAGES): shown as code, never as HTML.
  function withCode(text) {
    return String(text)
      .split("`")
      .map((part, i) => (i % 2 ? element("code", "", part) : document.createTextNode(part)));
  }

  function showError(message, code) {
    const box = $("error");
    box.replaceChildren(...withCode(message));
    box.dataset.code = code || "";
    box.hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
    $("error").textContent = "";
    $("notice").hidden = true;
    $("notice").replaceChildren();
  }

  // What each page status other than ok means, in the words a reader needs.
  const STATUS_NOTES = {
    retried: "Read again after a first attempt was cut short or looped; this text is from the clean attempt.",
    truncated:
      "Truncated: the model reached its token limit (`MAX_NEW_TOKENS`) on every attempt, so the end of this page may be missing.",
    repetitive: "Repetitive: the model got stuck repeating itself; the text may be incomplete.",
  };

  function pagesPhrase(numbers) {
    return `${numbers.length > 1 ? "pages" : "page"} ${numbers.join(", ")}`;
  }

  // A partial document says which pages are not clean and what that means.
  function showDocumentStatus(result) {
    const box = $("notice");
    if (result.status !== "partial") {
      box.hidden = true;
      box.replaceChildren();
      return;
    }
    const byStatus = new Map();
    for (const page of result.pages) {
      if (page.status === "ok" || page.status === "retried") continue;
      if (!byStatus.has(page.status)) byStatus.set(page.status, []);
      byStatus.get(page.status).push(page.page);
    }
    const parts = [...byStatus].map(([status, numbers]) => `${pagesPhrase(numbers)} ${status}`);
    const lines = [element("strong", "", `Partial document: ${parts.join("; ")}.`)];
    for (const status of byStatus.keys()) {
      if (!STATUS_NOTES[status]) continue;
      const line = element("p");
      line.append(...withCode(STATUS_NOTES[status]));
      lines.push(line);
    }
    box.replaceChildren(...lines);
    box.hidden = false;
  }

  // One slot per selected page, created in page order, filled as pages finish.
  function addSlot(number) {
    const slot = element("article", "page");
    slot.dataset.page = String(number);
    const header = element("header");
    header.append(element("h2", "", `Page ${number}`), element("span", "badge", "reading…"), element("span", "meta"));
    const copy = element("button", "quiet", "Copy");
    copy.type = "button";
    copy.disabled = true;
    copy.addEventListener("click", () => copyText(run.pages.get(number).text, copy));
    header.append(copy);
    const figure = element("figure");
    figure.append(element("p", "placeholder", "Rendering the page…"));
    const columns = element("div", "columns");
    columns.append(figure, element("div", "markdown pending", "Waiting for the model…"));
    slot.append(header, columns);
    // Pointer on a block's text lights its box(es) on the image, and the other way round.
    slot.addEventListener("mouseover", (event) => {
      const target = event.target.closest("[data-block]");
      highlight(slot, target ? target.dataset.block : null);
    });
    slot.addEventListener("mouseleave", () => highlight(slot, null));
    $("results").append(slot);
    paintImage(number);
  }

  function slotOf(number) {
    return $("results").querySelector(`.page[data-page="${number}"]`);
  }

  function paintImage(number) {
    const slot = slotOf(number);
    const rendered = run.images.get(number);
    if (!slot || !(rendered || run.imageError)) return;
    const figure = slot.querySelector("figure");
    if (!rendered) {
      figure.replaceChildren(element("p", "placeholder", `Image unavailable: ${run.imageError}`));
      return;
    }
    const img = element("img");
    img.src = rendered.image;
    img.alt = `Page ${number} as the model saw it`;
    img.width = rendered.width;
    img.height = rendered.height;
    const sheet = element("div", "sheet");
    sheet.append(img);
    figure.replaceChildren(sheet, element("figcaption", "", `${rendered.width} × ${rendered.height} px, as sent to the model`));
    paintBoxes(number);
  }

  function boxedBlocks(number) {
    const blocks = run.blocks.get(number) || [];
    return blocks.some((block) => block.bbox) ? blocks : null;
  }

  // Each block's boxes over the page image, in % of the image the model saw, so they follow its scaling.
  function paintBoxes(number) {
    const slot = slotOf(number);
    const page = run.pages.get(number);
    const blocks = boxedBlocks(number);
    const sheet = slot && slot.querySelector(".sheet");
    if (!sheet || !page || !blocks || !page.width || !page.height) return;
    sheet.querySelectorAll(".box").forEach((box) => box.remove());
    const boxes = [];
    blocks.forEach((block, i) => {
      const parts = block.bbox ? [block.bbox, ...(block.continuations || []).map((part) => part.bbox)] : [];
      for (const [x1, y1, x2, y2] of parts) {
        const box = element("div", "box");
        box.dataset.block = String(i);
        box.dataset.label = block.label || block.type;
        box.title = block.label || block.type;
        box.style.setProperty("--box", colorOf(block.label));
        box.style.left = `${(100 * x1) / page.width}%`;
        box.style.top = `${(100 * y1) / page.height}%`;
        box.style.width = `${(100 * (x2 - x1)) / page.width}%`;
        box.style.height = `${(100 * (y2 - y1)) / page.height}%`;
        boxes.push([(x2 - x1) * (y2 - y1), box]);
      }
    });
    boxes.sort((a, b) => b[0] - a[0]); // small boxes last, on top: each stays reachable by the pointer
    sheet.append(...boxes.map(([, box]) => box));
  }

  function highlight(slot, index) {
    for (const node of slot.querySelectorAll("[data-block]")) node.classList.toggle("hot", node.dataset.block === index);
  }

  // A page with boxes shows its blocks one by one (each can light its box); other pages show their markdown.
  function paintBlocks(body, blocks) {
    const dropping = $("drop-hf").checked;
    body.replaceChildren(
      ...blocks.map((block, i) => {
        const node = element("div", "block");
        node.dataset.block = String(i);
        node.dataset.label = block.label || block.type;
        node.style.setProperty("--box", colorOf(block.label));
        if (dropping && HEADER_FOOTER.has(block.label)) node.classList.add("dropped");
        node.innerHTML = renderMarkdown(withPictures(block.text, blocks));
        return node;
      }),
    );
  }

  function paintPage(page) {
    run.pages.set(page.page, page);
    const slot = slotOf(page.page);
    if (!slot) return;
    const badge = slot.querySelector(".badge");
    badge.textContent = page.status;
    badge.className = `badge ${page.status}`;
    const seconds = typeof page.seconds === "number" ? `${page.seconds.toFixed(1)} s` : "";
    slot.querySelector(".meta").textContent = [`${page.tokens} tokens`, seconds].filter(Boolean).join(" · ");
    badge.title = STATUS_NOTES[page.status] ? STATUS_NOTES[page.status].replaceAll("`", "") : "";
    const oldNote = slot.querySelector(".page-note");
    if (oldNote) oldNote.remove();
    if (page.status === "truncated" || page.status === "repetitive") {
      const note = element("p", "page-note");
      note.append(...withCode(STATUS_NOTES[page.status]));
      slot.querySelector("header").after(note);
    }
    const body = slot.querySelector(".markdown");
    if (page.status === "failed") {
      body.className = "markdown failed";
      body.textContent = `This page failed: ${page.error ? page.error.message : "no text"}`;
    } else if (boxedBlocks(page.page)) {
      body.className = "markdown blocks";
      paintBlocks(body, boxedBlocks(page.page));
    } else {
      body.className = "markdown";
      body.innerHTML = renderMarkdown(withPictures(page.text, run.blocks.get(page.page) || []));
    }
    paintBoxes(page.page);
    slot.querySelector("header button").disabled = page.status === "failed";
  }

  // The run ended in an error: never leave "Uploading…" up. Before any page there is nothing to show.
  function stopped() {
    if (!run || !run.started) {
      $("progress-text").textContent = "";
      $("status").hidden = true;
      return;
    }
    const text = $("progress-text");
    if (!text.textContent.endsWith(" · stopped")) text.textContent += " · stopped";
  }

  function paintProgress(done, total) {
    const bar = $("progress");
    bar.max = Math.max(total, 1);
    bar.value = done;
    const percent = total ? Math.round((100 * done) / total) : 100;
    $("progress-text").textContent = `${done} / ${total} pages (${percent}%)`;
  }

  function documentMarkdown() {
    if (run.result) return run.result.text;
    return [...run.pages.values()]
      .sort((a, b) => a.page - b.page)
      .map((page) => page.text)
      .join("\n\n");
  }

  function enableDownloads() {
    const any = run.result !== null || run.pages.size > 0;
    for (const id of ["copy-all", "download-md", "download-json"]) $(id).disabled = !any;
  }

  // ---------------------------------------------------------------- talking to the API

  function authHeaders(extra) {
    const key = $("key").value.trim();
    return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
  }

  // The API's error shape ({"error": {"code", "message"}}) in words; 401 says what to do.
  async function failureOf(response) {
    let error = { code: `http_${response.status}`, message: `${response.status} ${response.statusText}` };
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) error = body.error;
    } catch {
      // not JSON (a proxy's page, say): keep the status line
    }
    if (response.status === 401) {
      error = $("key").value.trim()
        ? { code: error.code, message: "API key invalid: the service refused the key in the API key field." }
        : { code: error.code, message: "API key required: enter the service's API key in the API key field." };
    }
    return error;
  }

  // Yields one parsed object per NDJSON line as the bytes arrive.
  async function* ndjson(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value, { stream: !done });
      const lines = buffer.split("\n");
      buffer = lines.pop();
      for (const line of lines) if (line.trim()) yield JSON.parse(line);
      if (done) break;
    }
    if (buffer.trim()) yield JSON.parse(buffer);
  }

  // `reading`: add the reading options (for api/inference; web/render takes the document fields only).
  function formData(file, reading) {
    const form = new FormData();
    form.append("file", file);
    const pages = $("pages").value.trim();
    const password = $("password").value;
    if (pages) form.append("pages", pages);
    if (password) form.append("password", password);
    if (reading) {
      if ($("mode").value !== "plain") form.append("mode", $("mode").value);
      if ($("drop-hf").checked) form.append("drop_headers_footers", "true");
      form.append("images", "inline"); // pictures with a box come with their crop, shown in the text
    }
    return form;
  }

  // Page images come from the service's own intake, so they are exactly what the model saw.
  async function loadImages(state, file) {
    try {
      const response = await fetch("web/render", {
        method: "POST",
        body: formData(file),
        headers: authHeaders({ Accept: "application/json" }),
        signal: state.controller.signal,
      });
      if (response.ok) {
        for (const page of (await response.json()).pages) state.images.set(page.page, page);
      } else {
        state.imageError = (await failureOf(response)).message;
      }
    } catch (err) {
      if (err.name === "AbortError") return;
      state.imageError = err.message;
    }
    if (run !== state) return;
    for (const slot of $("results").querySelectorAll(".page")) paintImage(Number(slot.dataset.page));
  }

  function handle(event) {
    switch (event.event) {
      case "start":
        run.started = true;
        event.pages.forEach((number) => addSlot(number));
        paintProgress(0, event.total);
        break;
      case "page":
        run.blocks.set(event.page.page, event.blocks || []);
        paintPage(event.page);
        enableDownloads();
        break;
      case "progress":
        run.seen = event.done; // the resume point of a followed job (Last-Event-ID)
        paintProgress(event.done, event.total);
        break;
      case "result": {
        run.result = event.result; // its pages were already shown, one `page` event each
        const failed = event.result.failed_pages.length;
        if (failed) showError(`${failed} page(s) failed: ${event.result.failed_pages.join(", ")}.`, "failed_pages");
        showDocumentStatus(event.result);
        enableDownloads();
        break;
      }
      case "error":
        run.ended = true;
        showError(event.error.message, event.error.code);
        stopped();
        break;
      default:
        break; // events added later are ignored, not fatal
    }
  }

  async function start(submit) {
    submit.preventDefault();
    const file = $("file").files[0];
    if (!file) {
      showError("Choose a PDF or image first.", "no_file");
      return;
    }
    if (run) run.controller.abort();
    const state = {
      controller: new AbortController(),
      pages: new Map(),
      blocks: new Map(),
      images: new Map(),
      imageError: null,
      result: null,
      started: false,
    };
    run = state;
    clearError();
    $("results").replaceChildren();
    $("status").hidden = false;
    paintProgress(0, 0);
    $("progress-text").textContent = "Uploading…";
    enableDownloads();
    $("run").disabled = true;
    const images = loadImages(state, file);
    try {
      const response = await fetch("api/inference", {
        method: "POST",
        body: formData(file, true),
        headers: authHeaders({ Accept: "application/x-ndjson" }),
        signal: state.controller.signal,
      });
      if (!response.ok) {
        const error = await failureOf(response);
        showError(error.message, error.code);
        stopped();
        state.controller.abort(); // no pages will come: stop rendering images too
        return;
      }
      for await (const event of ndjson(response.body)) {
        if (run !== state) return;
        handle(event);
      }
      if (!state.result && $("error").hidden && !state.ended) {
        showError("The connection closed before the document was finished.", "stream_closed");
        stopped();
      }
    } catch (err) {
      if (err.name !== "AbortError" && run === state) {
        showError(`The request failed: ${err.message}`, "network_error");
        stopped();
      }
    } finally {
      if (run === state) $("run").disabled = false;
    }
    await images;
  }

  // Follow a job (the page opened as `/#job=<id>`) from any replica: GET api/jobs/{id}/events gives the same
  // events as a stream; a cut connection resumes after the pages already shown (Last-Event-ID).
  async function followJob(id) {
    if (run) run.controller.abort();
    const state = {
      controller: new AbortController(),
      pages: new Map(),
      blocks: new Map(),
      images: new Map(),
      result: null,
      started: false,
    };
    state.imageError = "page images of a job are at api/jobs/{id}/pages/{n}/image";
    run = state;
    clearError();
    $("results").replaceChildren();
    $("status").hidden = false;
    paintProgress(0, 0);
    $("progress-text").textContent = `Following job ${id}…`;
    enableDownloads();
    for (let tries = 0; tries < 5 && run === state && !state.result && !state.ended; tries++) {
      if (tries) await new Promise((resolve) => setTimeout(resolve, 1000));
      const headers = { Accept: "application/x-ndjson" };
      if (state.started) headers["Last-Event-ID"] = String(state.seen || 0);
      try {
        const response = await fetch(`api/jobs/${encodeURIComponent(id)}/events`, {
          headers: authHeaders(headers),
          signal: state.controller.signal,
        });
        if (!response.ok) {
          const error = await failureOf(response);
          showError(error.message, error.code);
          stopped();
          return;
        }
        for await (const event of ndjson(response.body)) {
          if (run !== state) return;
          handle(event);
        }
      } catch (err) {
        if (err.name === "AbortError") return;
      }
    }
    if (run === state && !state.result && !state.ended) {
      showError("The connection to the job's events kept closing.", "stream_closed");
      stopped();
    }
  }

  // ---------------------------------------------------------------- copy and download

  async function copyText(text, button) {
    try {
      await navigator.clipboard.writeText(text);
    } catch {
      // navigator.clipboard needs a secure context (https or localhost): fall back.
      const area = element("textarea");
      area.value = text;
      document.body.append(area);
      area.select();
      document.execCommand("copy");
      area.remove();
    }
    const label = button.textContent;
    button.textContent = "Copied";
    setTimeout(() => (button.textContent = label), 1200);
  }

  function download(name, type, text) {
    const url = URL.createObjectURL(new Blob([text], { type }));
    const link = element("a");
    link.href = url;
    link.download = name;
    link.click();
    setTimeout(() => URL.revokeObjectURL(url), 0);
  }

  function baseName() {
    const file = $("file").files[0];
    return file ? file.name.replace(/\.[^.]*$/, "") || "document" : "document";
  }

  // ---------------------------------------------------------------- wiring

  function showFileName() {
    const file = $("file").files[0];
    $("drop-text").textContent = file ? `${file.name} (${Math.ceil(file.size / 1024)} KB)` : "Drop a PDF or image here, or click to choose one";
  }

  function wire() {
    const drop = $("drop");
    drop.addEventListener("dragover", (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (event) => {
      event.preventDefault();
      drop.classList.remove("over");
      if (event.dataTransfer.files.length) {
        $("file").files = event.dataTransfer.files;
        showFileName();
      }
    });
    $("file").addEventListener("change", showFileName);
    $("form").addEventListener("submit", start);

    const key = $("key");
    key.value = sessionStorage.getItem(KEY_STORAGE) || "";
    key.addEventListener("input", () => {
      if (key.value.trim()) sessionStorage.setItem(KEY_STORAGE, key.value.trim());
      else sessionStorage.removeItem(KEY_STORAGE);
    });

    $("copy-all").addEventListener("click", (event) => copyText(documentMarkdown(), event.currentTarget));
    $("download-md").addEventListener("click", () => download(`${baseName()}.md`, "text/markdown", documentMarkdown()));
    $("download-json").addEventListener("click", () => {
      const body = run.result || { pages: [...run.pages.values()].sort((a, b) => a.page - b.page) };
      download(`${baseName()}.json`, "application/json", JSON.stringify(body, null, 2));
    });
  }

  wire();
  const followed = /^#job=([\w-]+)$/.exec(window.location.hash);
  if (followed) followJob(followed[1]);
})();
