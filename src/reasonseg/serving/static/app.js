// reasonseg demo page: pick or upload an image, type an instruction, POST /v1/segment, show the overlay.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { blob: null, name: null, conversationId: null };

function setStatus(text) { $("status").textContent = text; }

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function resetConversation() {
  state.conversationId = null;
  $("chat").replaceChildren();
  $("overlay").hidden = true;
  $("targets").hidden = true;
  $("timings").textContent = "";
}

function chooseImage(blob, name) {
  state.blob = blob;
  state.name = name;
  const preview = $("preview");
  if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(blob);
  preview.hidden = false;
  resetConversation();
  showError("");
  $("submit").disabled = false;
}

async function loadExamples() {
  let items = [];
  try {
    const resp = await fetch("/v1/examples", { headers: authHeaders() });
    if (resp.ok) items = await resp.json();
  } catch (err) { /* the page still works with uploads */ }
  const box = $("examples");
  box.replaceChildren();
  for (const item of items) {
    const button = document.createElement("button");
    button.type = "button";
    button.title = item.title + ": " + item.instruction;
    button.dataset.name = item.name;
    const img = document.createElement("img");
    img.src = item.url;
    img.alt = item.title;
    button.append(img);
    button.addEventListener("click", async () => {
      const resp = await fetch(item.url);
      chooseImage(await resp.blob(), item.name);
      $("instruction").value = item.instruction;
      for (const b of box.children) b.classList.toggle("selected", b === button);
    });
    box.append(button);
  }
}

function authHeaders() {
  const token = $("token").value.trim();
  return token ? { Authorization: "Bearer " + token } : {};
}

function addTurn(who, text) {
  const li = document.createElement("li");
  const name = document.createElement("span");
  name.className = "who";
  name.textContent = who + ":";
  li.append(name, document.createTextNode(" " + text));
  $("chat").append(li);
}

function showTargets(targets) {
  const body = $("targets").querySelector("tbody");
  body.replaceChildren();
  for (const t of targets) {
    const row = document.createElement("tr");
    if (t.rejected) row.className = "rejected";
    const cells = [
      String(t.index),
      t.label || "target " + t.index,
      t.rejected ? "not in the image" : String(t.area),
      t.score === null ? "" : t.score.toFixed(3),
    ];
    for (const text of cells) {
      const td = document.createElement("td");
      td.textContent = text;
      row.append(td);
    }
    body.append(row);
  }
  $("targets").hidden = targets.length === 0;
}

async function submit(event) {
  event.preventDefault();
  const instruction = $("instruction").value.trim();
  if (!state.blob) { showError("Choose an example or upload an image first."); return; }
  if (!instruction) { showError("Type an instruction first."); return; }
  showError("");
  const form = new FormData();
  form.append("image", state.blob, state.name || "image");
  form.append("instruction", instruction);
  form.append("return_overlay", "true");
  form.append("return_masks", "false");
  if (state.conversationId) form.append("conversation_id", state.conversationId);
  $("submit").disabled = true;
  setStatus("working…");
  try {
    const resp = await fetch("/v1/segment", { method: "POST", body: form, headers: authHeaders() });
    let data = null;
    try { data = await resp.json(); } catch (err) { data = null; }
    if (!resp.ok) {
      const e = data && data.error;
      showError(e ? `${resp.status} ${e.code}: ${e.message}` : `HTTP ${resp.status}`);
      return;
    }
    state.conversationId = data.conversation_id;
    addTurn("you", instruction);
    addTurn("model", data.answer || "(empty answer)");
    const overlay = $("overlay");
    overlay.src = "data:image/png;base64," + data.overlay_png_base64;
    overlay.hidden = false;
    showTargets(data.targets);
    if (data.targets.length === 0) addTurn("note", "the answer names no target ([SEG]), so no mask is drawn");
    const t = data.timings_ms;
    $("timings").textContent =
      `total ${Math.round(t.total)} ms · model ${Math.round(t.model_call)} ms` +
      (data.cache_hit ? " · image already encoded" : ` · image encoding ${Math.round(t.encode_image)} ms`) +
      ` · batch of ${data.batch_size}` + (data.model ? ` · model: ${data.model}` : "");
    $("instruction").value = "";
  } catch (err) {
    showError("The server could not be reached: " + err);
  } finally {
    $("submit").disabled = !state.blob;
    setStatus("");
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("file").addEventListener("change", () => {
    const file = $("file").files[0];
    if (file) {
      chooseImage(file, file.name);
      for (const b of $("examples").children) b.classList.remove("selected");
    }
  });
  $("ask").addEventListener("submit", submit);
  $("new-conversation").addEventListener("click", resetConversation);
  $("token").addEventListener("change", loadExamples);
  loadExamples();
});
