// The playground: wires the page to the server's OpenAI-style API.

import { api, ApiError, sseEvents } from "./api.js";
import { attach, attachments, clearAttachments } from "./attachments.js";
import { installKeyDialog } from "./keydialog.js";
import { startStatusStrip } from "./status.js";
import {
  chatRequest, isWhisper, loadConversations, newConversation, saveConversations, savedCurrentId, SETTINGS,
} from "./store.js";
import { conversationItem, editInPlace, messageElement, showError, updateMessage } from "./view.js";

const $ = (id) => document.getElementById(id);
const state = { conversations: loadConversations(), currentId: savedCurrentId(), models: [], controller: null };

const current = () => state.conversations.find((c) => c.id === state.currentId);

function save() {
  const error = saveConversations(state.conversations, state.currentId);
  if (error) showError(`This browser would not keep the conversation (${error.name}): attached images fill its storage fastest.`);
}

// ---- models, conversations, settings ------------------------------------------------------------

async function loadModels() {
  try {
    const response = await api("/v1/models");
    state.models = (await response.json()).data.map((m) => m.id);
    showError("");
  } catch (error) {
    showError(`Cannot list the models: ${error.message}`);
    return;
  }
  const select = $("model");
  select.replaceChildren(...state.models.map((id) => new Option(id, id)));
  selectConversation(current() ? state.currentId : null);
}

function selectConversation(id) {
  if (!state.conversations.some((c) => c.id === id)) {
    const fresh = state.conversations.find((c) => !c.messages.length) || newConversation(state.models[0] || "");
    if (!state.conversations.includes(fresh)) state.conversations.unshift(fresh);
    id = fresh.id;
  }
  state.currentId = id;
  const conversation = current();
  if (!state.models.includes(conversation.model) && state.models.length) conversation.model = state.models[0];
  $("model").value = conversation.model;
  $("system").value = conversation.system;
  for (const name of SETTINGS) $(name).value = conversation.settings[name] ?? "";
  clearAttachments();
  modelChanged();
  render();
  save();
}

function modelChanged() {
  const whisper = isWhisper(current()?.model);
  $("attach").accept = whisper ? "audio/*" : "image/*";
  $("attach").multiple = !whisper;
  $("attach-text").textContent = whisper ? "Attach audio" : "Attach image";
  $("prompt").placeholder = whisper ? "Attach an audio file to transcribe, then Send"
    : "Send a message (Enter sends, Shift+Enter for a new line)";
}

function render() {
  const conversation = current();
  const list = $("conversations");
  list.replaceChildren(...state.conversations.map((c) => conversationItem(c, c.id === state.currentId,
    () => { if (!state.controller) selectConversation(c.id); closeSidebarOnPhone(); },
    () => deleteConversation(c.id))));
  const messages = conversation.messages;
  const lastAssistant = messages.findLastIndex((m) => m.role === "assistant");
  $("messages").replaceChildren(...messages.map((message, index) => {
    const actions = {};
    if (message.role === "user" && !message.audio) actions.Edit = (event) => editTurn(event.target.closest(".message"), index);
    if (index === lastAssistant && !isWhisper(conversation.model)) actions.Regenerate = regenerate;
    return messageElement(message, state.controller ? {} : actions);
  }));
  scrollToEnd(true);
}

function deleteConversation(id) {
  if (state.controller) return;
  state.conversations = state.conversations.filter((c) => c.id !== id);
  selectConversation(state.currentId === id ? null : state.currentId);
}

function scrollToEnd(force) {
  const box = $("messages");
  if (force || box.scrollHeight - box.scrollTop - box.clientHeight < 80) box.scrollTop = box.scrollHeight;
}

// ---- sending ------------------------------------------------------------------------------------

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  if (busy) $("stop").focus();
  else $("prompt").focus();
}

async function submit() {
  if (!state.models.length) await loadModels(); // the key was refused earlier: this asks again
  const conversation = current();
  if (state.controller || !conversation || !state.models.length) return;
  const text = $("prompt").value;
  const audio = attachments().find((a) => a.kind === "audio");
  if (isWhisper(conversation.model)) {
    if (!audio) return showError("A Whisper model transcribes audio: attach an audio file first.");
  } else if (!text.trim() && !attachments().length) {
    return;
  }
  const images = attachments().filter((a) => a.kind === "image").map((a) => a.url);
  conversation.messages.push({ role: "user", text, images, ...(audio ? { audio: audio.name } : {}) });
  if (conversation.title === "New chat") conversation.title = (text.trim() || audio?.name || "Image").slice(0, 48);
  $("prompt").value = "";
  clearAttachments();
  showError("");
  await (audio ? transcribe(conversation, audio.file) : generate(conversation));
}

async function stream(conversation, reply, request) {
  conversation.messages.push(reply);
  conversation.updated = Date.now();
  const controller = new AbortController();
  state.controller = controller;
  save();
  render();
  setBusy(true);
  const element = $("messages").lastElementChild;
  try {
    await request(controller.signal, () => {
      updateMessage(element, reply);
      scrollToEnd(false);
    });
  } catch (error) {
    if (error.name === "AbortError") reply.stopped = true;
    else reply.error = error.message;
  } finally {
    state.controller = null;
    setBusy(false);
    save();
    render();
  }
}

function generate(conversation) {
  const body = chatRequest(conversation);
  const reply = { role: "assistant", text: "", reasoning: "", toolCalls: [], model: conversation.model, stats: null };
  return stream(conversation, reply, async (signal, redraw) => {
    const started = performance.now();
    let first = null;
    let chunks = 0;
    let pending = false;
    const timing = (usage) => {
      const now = performance.now();
      const tokens = usage?.completion_tokens ?? chunks;
      reply.stats = {
        ttftMs: first == null ? null : first - started,
        tokensPerS: first != null && tokens > 1 && now > first ? ((tokens - 1) * 1000) / (now - first) : null,
        tokens: usage ? tokens : null,
      };
    };
    signal.addEventListener("abort", () => timing(null));
    const response = await api("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal,
    });
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) throw new ApiError(chunk.error.message, chunk.error.code);
      if (chunk.model) reply.model = chunk.model;
      if (chunk.usage) timing(chunk.usage);
      const delta = chunk.choices?.[0]?.delta;
      if (!delta) continue;
      if (delta.content || delta.reasoning_content || delta.tool_calls) {
        first ??= performance.now();
        chunks += 1;
      }
      reply.text += delta.content || "";
      reply.reasoning += delta.reasoning_content || "";
      for (const call of delta.tool_calls || []) mergeToolCall(reply.toolCalls, call);
      if (!chunk.usage) timing(null);
      if (!pending) {
        pending = true;
        requestAnimationFrame(() => { pending = false; redraw(); });
      }
    }
  });
}

function mergeToolCall(calls, delta) {
  const call = (calls[delta.index ?? calls.length - 1] ??= { id: "", type: "function", function: { name: "", arguments: "" } });
  if (delta.id) call.id = delta.id;
  if (delta.function?.name) call.function.name += delta.function.name;
  if (delta.function?.arguments) call.function.arguments += delta.function.arguments;
}

function transcribe(conversation, file) {
  const reply = { role: "assistant", text: "", model: conversation.model, stats: null };
  return stream(conversation, reply, async (signal) => {
    const form = new FormData();
    form.append("file", file, file.name);
    form.append("model", conversation.model);
    const started = performance.now();
    const response = await api("/v1/audio/transcriptions", { method: "POST", body: form, signal });
    reply.text = (await response.json()).text;
    reply.stats = { ttftMs: performance.now() - started, tokensPerS: null, tokens: null };
  });
}

function regenerate() {
  const conversation = current();
  if (state.controller) return;
  const lastUser = conversation.messages.findLastIndex((m) => m.role === "user");
  conversation.messages.splice(lastUser + 1);
  generate(conversation);
}

async function editTurn(element, index) {
  const conversation = current();
  const text = await editInPlace(element, conversation.messages[index].text);
  if (text == null || state.controller) return render();
  conversation.messages.splice(index + 1);
  conversation.messages[index].text = text;
  generate(conversation);
}

// ---- wiring -------------------------------------------------------------------------------------

function closeSidebarOnPhone() {
  $("sidebar").classList.remove("open");
  $("toggle-sidebar").setAttribute("aria-expanded", "false");
}

function toggle(buttonId, apply) {
  const button = $(buttonId);
  const open = button.getAttribute("aria-expanded") !== "true";
  button.setAttribute("aria-expanded", String(open));
  apply(open);
}

$("composer").addEventListener("submit", (event) => { event.preventDefault(); submit(); });
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    submit();
  }
});
$("prompt").addEventListener("paste", (event) => {
  const files = [...event.clipboardData.files].filter((file) => file.type.startsWith("image/"));
  if (files.length) {
    event.preventDefault();
    attach(files, isWhisper(current().model));
  }
});
$("attach").addEventListener("change", (event) => attach([...event.target.files], isWhisper(current().model)));
$("stop").addEventListener("click", () => state.controller?.abort());
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && state.controller && !$("key-dialog").open) state.controller.abort();
});
$("new-chat").addEventListener("click", () => {
  if (state.controller) return;
  selectConversation(null);
  closeSidebarOnPhone();
  $("prompt").focus();
});
$("model").addEventListener("change", (event) => {
  current().model = event.target.value;
  modelChanged();
  save();
});
$("system").addEventListener("input", (event) => { current().system = event.target.value; save(); });
for (const name of SETTINGS) $(name).addEventListener("input", (event) => { current().settings[name] = event.target.value; save(); });
$("toggle-settings").addEventListener("click", () => toggle("toggle-settings", (open) => { $("settings").hidden = !open; }));
$("toggle-sidebar").addEventListener("click", () => toggle("toggle-sidebar", (open) => $("sidebar").classList.toggle("open", open)));

installKeyDialog();
selectConversation(state.currentId);
loadModels();
startStatusStrip();
