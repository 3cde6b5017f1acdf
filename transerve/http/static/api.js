// Talking to the server as any OpenAI client does: the API key, error messages, the SSE stream, /metrics.

const KEY = "transerve.apiKey"; // session storage: gone when the tab closes

export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

let askForKey = null; // the page's dialog: async (serverMessage) => key, or null when the user cancels

export function onKeyNeeded(ask) {
  askForKey = ask;
}

export async function api(path, options = {}) {
  for (;;) {
    const headers = new Headers(options.headers || {});
    const key = sessionStorage.getItem(KEY);
    if (key) headers.set("Authorization", `Bearer ${key}`);
    let response;
    try {
      response = await fetch(path, { ...options, headers });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError(`cannot reach the server (${error.message})`, 0);
    }
    if (response.ok) return response;
    const message = await errorMessage(response);
    if (response.status === 401 && askForKey) {
      const newKey = await askForKey(message);
      if (newKey) {
        sessionStorage.setItem(KEY, newKey);
        continue;
      }
    }
    throw new ApiError(message, response.status);
  }
}

async function errorMessage(response) {
  const text = await response.text().catch(() => "");
  try {
    const message = JSON.parse(text).error?.message;
    if (message) return `${message} (HTTP ${response.status})`;
  } catch {
    // not JSON: fall through to the raw text
  }
  return `${text.trim().slice(0, 500) || response.statusText} (HTTP ${response.status})`;
}

// The JSON payloads of a text/event-stream body, until [DONE] or the end of the body.
export async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = block.split(/\r?\n/).filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

// Prometheus text: each metric's samples summed over their labels (one value per loaded model).
export function metricTotals(text) {
  const totals = {};
  for (const line of text.split("\n")) {
    const match = line.match(/^([A-Za-z_:][\w:]*)(?:\{[^}]*\})?\s+(\S+)/);
    if (match) totals[match[1]] = (totals[match[1]] || 0) + Number(match[2]);
  }
  return totals;
}
