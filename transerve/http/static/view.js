// Drawing messages and the conversation list. Model text goes through renderMarkdown (escaped) or
// textContent, never into innerHTML as it came.

import { renderMarkdown } from "./markdown.js";

export function showError(message) {
  const banner = document.getElementById("error");
  banner.textContent = message || "";
  banner.hidden = !message;
}

const template = () => document.getElementById("message-template");

function button(label, onClick, ariaLabel) {
  const element = document.createElement("button");
  element.type = "button";
  element.textContent = label;
  if (ariaLabel) element.setAttribute("aria-label", ariaLabel);
  element.addEventListener("click", onClick);
  return element;
}

export function statsText(message) {
  const parts = [message.model];
  const stats = message.stats;
  if (stats) {
    if (stats.tokensPerS != null) parts.push(`${stats.tokensPerS.toFixed(1)} tok/s`);
    if (stats.ttftMs != null) parts.push(`TTFT ${Math.round(stats.ttftMs)} ms`);
    if (stats.tokens != null) parts.push(`${stats.tokens} tokens`);
  }
  if (message.stopped) parts.push("stopped");
  return parts.filter(Boolean).join(" · ");
}

// One message's element; `actions` maps button labels to handlers (Edit, Regenerate).
export function messageElement(message, actions = {}) {
  const element = template().content.firstElementChild.cloneNode(true);
  element.classList.add(message.role);
  element.querySelector(".role").textContent = message.role === "user" ? "You" : "Assistant";
  updateMessage(element, message);
  const bar = element.querySelector(".actions");
  for (const [label, handler] of Object.entries(actions)) bar.append(button(label, handler));
  return element;
}

export function updateMessage(element, message) {
  element.querySelector(".meta").textContent = message.role === "assistant" ? statsText(message) : "";
  const body = element.querySelector(".body");
  if (message.role === "user") {
    body.replaceChildren();
    for (const url of message.images || []) {
      const image = document.createElement("img");
      image.src = url;
      image.alt = "attached image";
      image.className = "thumb";
      body.append(image);
    }
    if (message.audio) {
      const audio = document.createElement("p");
      audio.className = "audio-name";
      audio.textContent = `Audio: ${message.audio}`;
      body.append(audio);
    }
    const text = document.createElement("div");
    text.className = "user-text";
    text.textContent = message.text;
    body.append(text);
  } else {
    body.innerHTML = renderMarkdown(message.text || "");
    if (message.error) {
      const error = document.createElement("p");
      error.className = "message-error";
      error.setAttribute("role", "alert");
      error.textContent = message.error;
      body.append(error);
    }
  }
  const thinking = element.querySelector(".thinking");
  thinking.hidden = !message.reasoning;
  if (message.reasoning) thinking.querySelector(".thinking-body").innerHTML = renderMarkdown(message.reasoning);
  const calls = element.querySelector(".tool-calls");
  calls.hidden = !(message.toolCalls && message.toolCalls.length);
  if (!calls.hidden) {
    const pre = document.createElement("pre");
    pre.textContent = JSON.stringify(message.toolCalls.map(readableCall), null, 2);
    const label = document.createElement("p");
    label.textContent = "Tool calls";
    calls.replaceChildren(label, pre);
  }
}

function readableCall(call) {
  try {
    return { ...call, function: { ...call.function, arguments: JSON.parse(call.function.arguments) } };
  } catch {
    return call; // arguments that are not (yet) JSON are shown as the string they are
  }
}

// An inline editor replacing a user message's text; resolves with the new text, or null.
export function editInPlace(element, text) {
  return new Promise((resolve) => {
    const body = element.querySelector(".body .user-text");
    const area = document.createElement("textarea");
    area.value = text;
    area.rows = Math.min(10, text.split("\n").length + 1);
    area.setAttribute("aria-label", "Edit message");
    const done = (value) => {
      editor.replaceWith(body);
      resolve(value);
    };
    const bar = document.createElement("div");
    bar.className = "actions";
    bar.append(button("Cancel", () => done(null)), button("Send", () => done(area.value)));
    const editor = document.createElement("div");
    editor.className = "editor";
    editor.append(area, bar);
    area.addEventListener("keydown", (event) => {
      if (event.key === "Escape") done(null);
      if (event.key === "Enter" && !event.shiftKey) {
        event.preventDefault();
        done(area.value);
      }
    });
    body.replaceWith(editor);
    area.focus();
  });
}

export function conversationItem(conversation, isCurrent, onOpen, onDelete) {
  const item = document.createElement("li");
  const open = button(conversation.title || "New chat", onOpen);
  open.className = "conversation";
  if (isCurrent) open.setAttribute("aria-current", "true");
  const remove = button("×", onDelete, `Delete conversation ${conversation.title}`);
  remove.className = "icon delete";
  item.append(open, remove);
  return item;
}
