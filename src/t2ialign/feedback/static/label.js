// t2ialign labelling pages (/label and /pairs). No framework, no build step.
//
// Every keypress becomes one request with its own request_id; a request that fails on the network
// is retried with the same id until the server answers (the server ignores a repeated id), so a
// label is never lost or doubled by a flaky connection. Actions run one after another in a queue.
(() => {
  "use strict";

  const $ = (id) => document.getElementById(id);
  let state = JSON.parse($("state").textContent);
  const mode = state.mode; // "images" | "pairs"
  let cursor = 0; // images mode: the highlighted card
  let marks = {}; // images mode: generation id -> "good" | "bad" | "skip"
  let pending = new Set(); // ids whose label is not acknowledged yet
  let queue = Promise.resolve();

  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const rid = () =>
    window.crypto && crypto.randomUUID
      ? crypto.randomUUID()
      : Date.now().toString(36) + "-" + Math.random().toString(36).slice(2, 12);

  let toastTimer = null;
  function toast(text, kind = "", sticky = false) {
    const t = $("toast");
    t.textContent = text;
    t.className = "toast " + kind;
    t.hidden = false;
    clearTimeout(toastTimer);
    if (!sticky) toastTimer = setTimeout(() => (t.hidden = true), 2600);
  }

  // Run fn after every earlier action; an action that throws is reported and the queue goes on.
  function enqueue(fn) {
    queue = queue.then(fn).catch((e) => toast(e.message || String(e), "error"));
    return queue;
  }

  async function call(method, url, body) {
    for (let attempt = 0; ; attempt++) {
      let resp;
      try {
        resp = await fetch(url, {
          method,
          credentials: "same-origin",
          headers: body ? { "Content-Type": "application/json" } : {},
          body: body ? JSON.stringify(body) : undefined,
        });
      } catch (e) {
        toast("Connection lost: retrying… your labels are kept", "warn", true);
        await sleep(Math.min(8000, 400 * 2 ** attempt));
        continue;
      }
      if (resp.status === 401) {
        location.href = "/login";
        throw new Error("logged out");
      }
      let data = {};
      try {
        data = await resp.json();
      } catch (e) {
        /* not JSON */
      }
      if (resp.status >= 500 && attempt < 8) {
        toast("Server trouble: retrying…", "warn", true);
        await sleep(Math.min(8000, 400 * 2 ** attempt));
        continue;
      }
      if (attempt > 0) $("toast").hidden = true;
      if (!resp.ok) {
        const err = new Error(data.error || resp.statusText);
        err.status = resp.status;
        throw err;
      }
      return data;
    }
  }

  // ------------------------------------------------------------------ rendering

  function setProgress(progress) {
    if (!progress) return;
    const p = progress[mode];
    const pct = (a, b) => (b ? (100 * a) / b : 0);
    $("bar-mine").style.width = pct(p.mine, p.mine_total).toFixed(1) + "%";
    $("num-mine").textContent = `${p.mine} of ${p.mine_total}`;
    $("bar-project").style.width = pct(p.project, p.project_total).toFixed(1) + "%";
    $("num-project").textContent =
      `${pct(p.project, p.project_total).toFixed(0)}% · ${p.project} of ${p.project_total}`;
  }

  // One more answer of mine: the bars move at once; exact numbers come with the next screen.
  function bump(fillsSlot) {
    const p = state.progress && state.progress[mode];
    if (!p) return;
    p.mine = Math.min(p.mine + 1, p.mine_total);
    if (fillsSlot) p.project = Math.min(p.project + 1, p.project_total);
    setProgress(state.progress);
  }

  function render() {
    const cards = $("cards");
    const tpl = $("card-tpl");
    cards.innerHTML = "";
    const empty = state.items.length === 0;
    $("done").hidden = !empty;
    $("question").hidden = empty;
    if ($("choices")) $("choices").hidden = empty;
    $("prompt").textContent = empty ? "" : `“${state.prompt}”`;
    $("prompt").classList.toggle("long", !empty && state.prompt.length > 80);
    $("task").textContent = empty ? "" : state.task;
    state.items.forEach((it, i) => {
      const node = tpl.content.firstElementChild.cloneNode(true);
      node.dataset.id = it.id;
      const img = node.querySelector("img");
      img.src = it.src;
      // small images (the shapes world's 32 px) scale up pixel by pixel, large ones smoothly
      const box = Number(img.getAttribute("width"));
      img.classList.toggle("px", it.width < box && it.height < box);
      img.title = `${it.width} x ${it.height} px`;
      if (mode === "images") {
        node.querySelector(".num").textContent = String(i + 1);
        img.alt = `image ${i + 1}`;
        node.addEventListener("click", (ev) => {
          const b = ev.target.closest("button");
          if (b) labelId(it.id, b.dataset.value);
          else setCursor(i);
        });
      } else {
        const side = i === 0 ? "left" : "right";
        node.dataset.side = side;
        node.querySelector(".num").textContent = i === 0 ? "Left" : "Right";
        img.alt = `${side} image`;
        node.addEventListener("click", () => choose(side));
      }
      cards.appendChild(node);
    });
    paint();
    setProgress(state.progress);
  }

  function paint() {
    document.querySelectorAll("#cards .card").forEach((node, i) => {
      const id = Number(node.dataset.id);
      node.classList.toggle("current", mode === "images" && i === cursor && !marks[id]);
      for (const v of ["good", "bad", "skip"]) node.classList.toggle("v-" + v, marks[id] === v);
      node.classList.toggle("pending", pending.has(id));
    });
  }

  function setCursor(i) {
    cursor = Math.max(0, Math.min(state.items.length - 1, i));
    paint();
  }

  function firstUnlabelled(from) {
    const n = state.items.length;
    for (let k = 0; k < n; k++) {
      const i = (from + k) % n;
      if (!marks[state.items[i].id]) return i;
    }
    return -1;
  }

  async function loadNext() {
    state = await call("GET", `/api/next?mode=${mode}`);
    marks = {};
    pending = new Set();
    cursor = 0;
    render();
  }

  // ------------------------------------------------------------------ images mode
  // Keys and clicks become actions that run one after another: an action sees the state that the
  // previous ones (an undo, a new screen) left, however fast the keys come.

  function labelAt(i, value) {
    enqueue(() => doLabel(() => state.items[i === undefined ? cursor : i], value));
  }

  function labelId(id, value) {
    enqueue(() => doLabel(() => state.items.find((x) => x.id === id), value));
  }

  async function doLabel(pick, value) {
    const it = pick();
    if (!it || marks[it.id]) return; // gone, or labelled already: undo first
    const i = state.items.indexOf(it);
    marks[it.id] = value;
    pending.add(it.id);
    const next = firstUnlabelled(i);
    if (next >= 0) cursor = next;
    paint();
    const body = { generation_id: it.id, value, request_id: rid() };
    try {
      const r = await call("POST", "/api/labels", body);
      if (!r.duplicate) bump(value !== "skip");
    } catch (e) {
      delete marks[it.id];
      toast(e.message, "error");
      if (e.status === 409) {
        await loadNext(); // given to someone else meanwhile, or labelled in another tab
        return;
      }
    } finally {
      pending.delete(it.id);
      paint();
    }
    if (state.items.length && state.items.every((x) => marks[x.id])) {
      await sleep(180); // let the last mark show
      await loadNext();
    }
  }

  function undo() {
    enqueue(async () => {
      const r = await call("POST", "/api/undo", { mode });
      setProgress(r.progress);
      if (!r.undone) {
        toast("Nothing to undo");
        return;
      }
      if (mode === "images") {
        const i = state.items.findIndex((x) => x.id === r.undone.generation_id);
        toast(`Undone: ${r.undone.value}`);
        if (i >= 0) {
          delete marks[r.undone.generation_id];
          setCursor(i);
          return;
        }
      } else {
        toast(`Undone: ${r.undone.choice}`);
      }
      await loadNext(); // the undone image (pair) comes back first
    });
  }

  // ------------------------------------------------------------------ pairs mode

  function choose(choice) {
    enqueue(async () => {
      if (state.items.length < 2) return;
      const [left, right] = state.items;
      document.querySelectorAll("#cards .card").forEach((node) => {
        node.classList.toggle("chosen", choice !== "tie" && node.dataset.side === choice);
        node.classList.toggle("chosen-tie", choice === "tie");
      });
      const body = { left: left.id, right: right.id, choice, request_id: rid() };
      try {
        const r = await call("POST", "/api/comparisons", body);
        if (!r.duplicate) bump(true);
        await sleep(150);
      } catch (e) {
        toast(e.message, "error");
      }
      await loadNext();
    });
  }

  // ------------------------------------------------------------------ keyboard

  document.addEventListener("keydown", (ev) => {
    if (ev.altKey || ev.metaKey || (ev.ctrlKey && ev.key.toLowerCase() !== "z")) return;
    if (ev.target.closest && ev.target.closest("input, textarea")) return;
    const k = ev.key.length === 1 ? ev.key.toLowerCase() : ev.key;
    let handled = true;
    if (k === "z" || k === "Backspace") undo();
    else if (mode === "images") {
      if (k === "g" || k === "1") labelAt(undefined, "good");
      else if (k === "b" || k === "2") labelAt(undefined, "bad");
      else if (k === "s" || k === "3") labelAt(undefined, "skip");
      else if (k === "ArrowLeft") setCursor(cursor - 1);
      else if (k === "ArrowRight") setCursor(cursor + 1);
      else if (k === "p") location.href = "/pairs";
      else handled = false;
    } else {
      if (k === "ArrowLeft" || k === "a") choose("left");
      else if (k === "ArrowRight" || k === "l") choose("right");
      else if (k === "ArrowDown" || k === "t" || k === " ") choose("tie");
      else if (k === "i") location.href = "/label";
      else handled = false;
    }
    if (handled) ev.preventDefault();
  });

  if ($("choices")) {
    $("choices").addEventListener("click", (ev) => {
      const b = ev.target.closest("button");
      if (b) choose(b.dataset.choice);
    });
  }

  render();
})();
