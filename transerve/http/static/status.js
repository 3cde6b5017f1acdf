// The status strip: requests running and waiting, and the KV cache in use, summed over loaded models.

import { api, metricTotals } from "./api.js";

const $ = (id) => document.getElementById(id);

async function poll() {
  if (document.hidden) return;
  try {
    const totals = metricTotals(await (await api("/metrics")).text());
    const used = totals.transerve_kv_blocks_used || 0;
    const all = used + (totals.transerve_kv_blocks_free || 0);
    $("status-running").textContent = `running ${totals.transerve_num_requests_running || 0}`;
    $("status-waiting").textContent = `waiting ${totals.transerve_num_requests_waiting || 0}`;
    $("status-kv").textContent = `KV cache ${all ? Math.round((100 * used) / all) : 0}%`;
  } catch {
    $("status-running").textContent = "metrics unavailable";
  }
}

export function startStatusStrip(everyMs = 1500) {
  poll();
  setInterval(poll, everyMs);
}
