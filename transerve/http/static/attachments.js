// Files waiting to go with the next message: images (as data: URLs, for vision models) or one audio file.

const $ = (id) => document.getElementById(id);
let items = []; // {kind: "image", name, url} | {kind: "audio", name, file}

export const attachments = () => items;

export function clearAttachments() {
  items = [];
  $("attach").value = "";
  draw();
}

// `whisper`: the picked model transcribes, so a file of any type is taken as its audio.
export async function attach(files, whisper) {
  for (const file of files) {
    if (file.type.startsWith("image/")) {
      items.push({ kind: "image", name: file.name || "pasted image", url: await readDataUrl(file) });
    } else if (file.type.startsWith("audio/") || whisper) {
      items = items.filter((a) => a.kind !== "audio");
      items.push({ kind: "audio", name: file.name, file });
    }
  }
  draw();
}

function draw() {
  $("attachments").replaceChildren(...items.map((attachment, index) => {
    const chip = document.createElement("span");
    chip.className = "chip";
    if (attachment.kind === "image") {
      const image = document.createElement("img");
      image.src = attachment.url;
      image.alt = `attached image ${attachment.name}`;
      chip.append(image);
    } else {
      chip.append(attachment.name);
    }
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `Remove ${attachment.name}`);
    remove.onclick = () => { items.splice(index, 1); draw(); };
    chip.append(remove);
    return chip;
  }));
}

function readDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}
