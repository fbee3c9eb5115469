// The reader's page: one image at a time, zoom/pan/reset, window/level for grey studies, class +
// confidence, resumable. The link's one-time token comes in the URL fragment (never sent to a
// server); it leaves the address bar at once and is POSTed once, in the Authorization header, to
// /api/session, which uses it up and sets an HttpOnly session cookie: the copy of the link the
// browser's history may keep opens nothing afterwards. Nothing is kept in web storage.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");
  const source = document.createElement("canvas"); // the image as served
  const shown = document.createElement("canvas"); // the image after window/level
  const state = { session: null, position: 0, item: null, scale: 1, tx: 0, ty: 0, answered: 0 };
  let activeSince = null;
  let activeMs = 0;

  const link = new URLSearchParams(location.hash.slice(1)).get("t");
  if (location.hash) history.replaceState(null, "", location.pathname); // the token leaves the address bar

  async function api(method, path, body) {
    const opts = { method, headers: {}, cache: "no-store" };
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    const res = await fetch(path, opts);
    if (!res.ok) {
      let detail = res.statusText;
      try { detail = (await res.json()).detail || detail; } catch (e) { /* not JSON */ }
      throw new Error(res.status + ": " + detail);
    }
    return res;
  }

  function say(text) { $("status").textContent = text; }

  function startTimer() { activeMs = 0; activeSince = document.visibilityState === "visible" ? Date.now() : null; }
  function elapsed() { return activeMs + (activeSince === null ? 0 : Date.now() - activeSince); }
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") activeSince = Date.now();
    else if (activeSince !== null) { activeMs += Date.now() - activeSince; activeSince = null; }
  });

  function draw() {
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.imageSmoothingEnabled = state.scale < 2;
    ctx.setTransform(state.scale, 0, 0, state.scale, state.tx, state.ty);
    ctx.drawImage(shown, 0, 0, canvas.width, canvas.height);
    canvas.dataset.scale = state.scale.toFixed(3);
    canvas.dataset.tx = Math.round(state.tx);
    canvas.dataset.ty = Math.round(state.ty);
  }

  function applyWindow() {
    const w = Number($("window").value);
    const l = Number($("level").value);
    const sctx = source.getContext("2d");
    const img = sctx.getImageData(0, 0, source.width, source.height);
    if (state.session && state.session.greyscale && !(w === 255 && l === 128)) {
      const lo = l - w / 2;
      const d = img.data;
      for (let i = 0; i < d.length; i += 4) {
        for (let c = 0; c < 3; c++) d[i + c] = Math.max(0, Math.min(255, ((d[i + c] - lo) * 255) / w));
      }
    }
    shown.width = source.width;
    shown.height = source.height;
    shown.getContext("2d").putImageData(img, 0, 0);
    canvas.dataset.window = w;
    canvas.dataset.level = l;
    draw();
  }

  function resetView() {
    state.scale = 1; state.tx = 0; state.ty = 0;
    $("window").value = 255; $("level").value = 128;
    applyWindow();
  }

  function zoom(factor, cx, cy) {
    const next = Math.max(1, Math.min(16, state.scale * factor));
    const k = next / state.scale;
    state.tx = cx - k * (cx - state.tx);
    state.ty = cy - k * (cy - state.ty);
    state.scale = next;
    if (state.scale === 1) { state.tx = 0; state.ty = 0; }
    draw();
  }

  let drag = null;
  canvas.addEventListener("pointerdown", (e) => {
    drag = { x: e.clientX, y: e.clientY, tx: state.tx, ty: state.ty };
    canvas.setPointerCapture(e.pointerId);
    canvas.classList.add("dragging");
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!drag) return;
    const r = canvas.getBoundingClientRect();
    const s = canvas.width / r.width;
    state.tx = drag.tx + (e.clientX - drag.x) * s;
    state.ty = drag.ty + (e.clientY - drag.y) * s;
    draw();
  });
  const endDrag = () => { drag = null; canvas.classList.remove("dragging"); };
  canvas.addEventListener("pointerup", endDrag);
  canvas.addEventListener("pointercancel", endDrag);
  canvas.addEventListener("wheel", (e) => {
    e.preventDefault();
    const r = canvas.getBoundingClientRect();
    const s = canvas.width / r.width;
    zoom(e.deltaY < 0 ? 1.25 : 0.8, (e.clientX - r.left) * s, (e.clientY - r.top) * s);
  }, { passive: false });
  $("zoom-in").addEventListener("click", () => zoom(1.25, canvas.width / 2, canvas.height / 2));
  $("zoom-out").addEventListener("click", () => zoom(0.8, canvas.width / 2, canvas.height / 2));
  $("reset").addEventListener("click", resetView);
  $("window").addEventListener("input", applyWindow);
  $("level").addEventListener("input", applyWindow);

  function chosen(name) {
    const el = document.querySelector(`input[name="${name}"]:checked`);
    return el ? el.value : null;
  }

  function radios(container, name, values) {
    for (const v of values) {
      const label = document.createElement("label");
      const input = document.createElement("input");
      input.type = "radio";
      input.name = name;
      input.value = String(v);
      label.append(input, " " + v);
      container.append(label);
    }
  }

  function updateProgress() {
    const s = state.session;
    $("progress").textContent = `Image ${state.position + 1} of ${s.items} · ${state.answered} answered`;
    $("submit").disabled = state.answered < s.items || s.submitted;
    $("prev").disabled = state.position === 0;
    $("next").textContent = state.position === s.items - 1 ? "Save" : "Save and next →";
  }

  async function show(position) {
    const item = await (await api("GET", `/api/items/${position}`)).json();
    const blob = await (await api("GET", `/api/images/${item.item}`)).blob();
    const bitmap = await createImageBitmap(blob);
    source.width = bitmap.width;
    source.height = bitmap.height;
    source.getContext("2d").drawImage(bitmap, 0, 0);
    state.position = position;
    state.item = item.item;
    state.loaded = { answer: item.answer, confidence: item.confidence === null ? null : String(item.confidence) };
    for (const el of document.querySelectorAll('input[type="radio"]')) {
      el.checked = (el.name === "class" && el.value === item.answer) ||
        (el.name === "confidence" && item.confidence !== null && el.value === String(item.confidence));
    }
    canvas.dataset.item = item.item;
    canvas.dataset.position = position;
    resetView();
    startTimer();
    updateProgress();
    say(item.answer ? "Answered; you can change it until you submit." : "");
  }

  async function save() {
    const answer = chosen("class");
    const confidence = chosen("confidence");
    if (!answer || !confidence) { say("Choose a class and a confidence first."); return false; }
    const res = await (await api("PUT", `/api/answers/${state.item}`,
      { answer, confidence: Number(confidence), active_ms: elapsed() })).json();
    state.answered = res.answered;
    state.loaded = { answer, confidence };
    startTimer();
    updateProgress();
    say("Saved.");
    return true;
  }

  async function run(action) {
    try { await action(); } catch (e) { say("Error " + e.message); }
  }

  $("next").addEventListener("click", () => run(async () => {
    if (await save() && state.position < state.session.items - 1) await show(state.position + 1);
  }));
  $("prev").addEventListener("click", () => run(async () => {
    const changed = chosen("class") !== state.loaded.answer || chosen("confidence") !== state.loaded.confidence;
    if (changed && chosen("class") && chosen("confidence")) await save(); // a changed answer is kept
    if (state.position > 0) await show(state.position - 1);
  }));
  $("submit").addEventListener("click", () => run(async () => {
    if (!confirm("Submit the study? Answers cannot change afterwards.")) return;
    await api("POST", "/api/submit");
    state.session.submitted = true;
    $("study").hidden = true;
    $("message").textContent = "Thank you: your answers are submitted.";
    document.body.dataset.submitted = "true";
  }));
  document.addEventListener("keydown", (e) => {
    if (e.target.tagName === "INPUT" && e.target.type === "range") return;
    if (e.key === "+") zoom(1.25, canvas.width / 2, canvas.height / 2);
    else if (e.key === "-") zoom(0.8, canvas.width / 2, canvas.height / 2);
    else if (e.key === "0") resetView();
  });

  async function start() {
    // a used link (the reader came back through it) still opens the study while this browser's session lasts
    const res = link
      ? await fetch("/api/session", { method: "POST", headers: { Authorization: "Bearer " + link }, cache: "no-store" })
      : await fetch("/api/session", { cache: "no-store" });
    if (res.status === 401) {
      $("message").textContent = link
        ? "This link is used up, expired or revoked. Ask the study's admin for a new link."
        : "Open this page through your personal study link.";
      return;
    }
    if (!res.ok) throw new Error(res.status + ": " + res.statusText);
    const s = link ? await (await api("GET", "/api/session")).json() : await res.json();
    state.session = s;
    state.answered = s.answered;
    $("question").textContent = s.question;
    radios($("classes"), "class", s.classes);
    radios($("confidence"), "confidence", [1, 2, 3, 4, 5]);
    $("wl").hidden = !s.greyscale;
    if (s.submitted) {
      $("message").textContent = "Your answers are submitted. Thank you.";
      document.body.dataset.submitted = "true";
      return;
    }
    $("study").hidden = false;
    await show(s.resume_at);
    document.body.dataset.ready = "true";
  }

  start().catch((e) => { $("message").textContent = "Could not open the study: " + e.message; });
})();
