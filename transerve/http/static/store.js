// Conversations in the browser's local storage, and their shape as the chat API wants it.
//
// A conversation: {id, title, model, system, settings: {temperature, top_p, max_tokens, seed, json_schema}, messages,
// updated}. A user message: {role, text, images: [data: URL], audio: file name}. An assistant message:
// {role, text, reasoning, toolCalls, model, stats: {ttftMs, tokensPerS, tokens}, error, stopped}.

const STORE = "transerve.conversations";
const CURRENT = "transerve.current";
const NUMBERS = ["temperature", "top_p", "max_tokens", "seed"];
export const SETTINGS = [...NUMBERS, "json_schema"];

export function loadConversations() {
  try {
    const list = JSON.parse(localStorage.getItem(STORE) || "[]");
    return Array.isArray(list) ? list : [];
  } catch {
    return [];
  }
}

// Returns the error when the browser refuses (its quota is a few MB; images fill it fastest).
export function saveConversations(conversations, currentId) {
  try {
    localStorage.setItem(STORE, JSON.stringify(conversations));
    localStorage.setItem(CURRENT, currentId || "");
    return null;
  } catch (error) {
    return error;
  }
}

export function savedCurrentId() {
  return localStorage.getItem(CURRENT);
}

export function newConversation(model) {
  return {
    id: `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`,
    title: "New chat",
    model,
    system: "",
    settings: Object.fromEntries(SETTINGS.map((name) => [name, ""])),
    messages: [],
    updated: Date.now(),
  };
}

// The request body for /v1/chat/completions (settings left empty mean the model's defaults).
export function chatRequest(conversation) {
  const messages = [];
  if (conversation.system.trim()) messages.push({ role: "system", content: conversation.system });
  for (const message of conversation.messages) {
    if (message.role === "user") {
      const images = message.images || [];
      messages.push({
        role: "user",
        content: images.length
          ? [...images.map((url) => ({ type: "image_url", image_url: { url } })), { type: "text", text: message.text }]
          : message.text,
      });
    } else if (message.text) {
      messages.push({ role: "assistant", content: message.text });
    }
  }
  const body = { model: conversation.model, messages, stream: true, stream_options: { include_usage: true } };
  for (const name of NUMBERS) {
    const value = conversation.settings[name];
    if (value !== "" && value !== undefined && !Number.isNaN(Number(value))) body[name] = Number(value);
  }
  const schema = (conversation.settings.json_schema || "").trim();
  if (schema) {
    let parsed = schema; // text that is not JSON goes as it is: the server's 400 then says what is wrong
    try { parsed = JSON.parse(schema); } catch {}
    body.response_format = { type: "json_schema", json_schema: { name: "playground", schema: parsed } };
  }
  return body;
}

export function isWhisper(model) {
  return /whisper/i.test(model || "");
}
