// Live refresh for the Fly workers dashboard: every few seconds, while the tab is visible, it
// fetches the page's sections (server-rendered, as JSON) and swaps them in. Without JavaScript
// the page is the same, only frozen at load time.
(function () {
  "use strict";
  const root = document.getElementById("fw-dashboard");
  if (!root || !window.fetch) return;
  const url = root.dataset.liveUrl;
  const every = (parseInt(root.dataset.refresh, 10) || 5) * 1000;
  const status = root.querySelector("[data-live-status]");
  let inFlight = false;

  async function refresh() {
    if (inFlight || document.visibilityState === "hidden") return;
    inFlight = true;
    try {
      const response = await fetch(url, {
        credentials: "same-origin",
        headers: { Accept: "application/json" },
      });
      if (!response.ok) throw new Error("HTTP " + response.status);
      const data = await response.json();
      for (const [name, html] of Object.entries(data.html)) {
        const section = root.querySelector('[data-live="' + name + '"]');
        // Never swap a section under someone typing or clicking in it.
        if (section && !section.contains(document.activeElement)) section.innerHTML = html;
      }
      root.dataset.refreshes = String(parseInt(root.dataset.refreshes || "0", 10) + 1);
      if (status) status.textContent = "Live · updated " + new Date(data.generated_at).toLocaleTimeString();
    } catch (error) {
      if (status) status.textContent = "Live refresh failed (" + error.message + "); retrying";
    } finally {
      inFlight = false;
    }
  }

  setInterval(refresh, every);
  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "visible") refresh();
    else if (status) status.textContent = "Paused while this tab is hidden";
  });
})();
