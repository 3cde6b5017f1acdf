// Asks for the API key when the server answers 401, showing the server's own message; calls that
// hit 401 together share one dialog. Cancelling leaves that message on the page.

import { onKeyNeeded } from "./api.js";
import { showError } from "./view.js";

const $ = (id) => document.getElementById(id);

let keyPrompt = null; // the open dialog's answer, while one is open

export function installKeyDialog() {
  onKeyNeeded(ask);
}

function ask(message) {
  keyPrompt ??= new Promise((resolve) => {
    const dialog = $("key-dialog");
    $("key-message").textContent = message;
    $("key-input").value = "";
    const finish = (key) => {
      keyPrompt = null;
      dialog.close();
      if (!key) showError(message);
      resolve(key);
    };
    $("key-form").onsubmit = (event) => {
      event.preventDefault();
      finish($("key-input").value.trim());
    };
    $("key-cancel").onclick = () => finish(null);
    dialog.oncancel = (event) => {
      event.preventDefault();
      finish(null);
    };
    dialog.showModal();
  });
  return keyPrompt;
}
